print("quiesce-bench")
