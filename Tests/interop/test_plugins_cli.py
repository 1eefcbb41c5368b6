"""`quiesce plugins` and `quiesce plan` as an operator uses them: the built-ins,
a broken plugin on the path, plans from saved facts and from a connected agent,
exit codes and JSON. Nothing here freezes anything."""
import json
import os
import subprocess
import time

from conftest import wait_for

HASH_A = "ab" * 32
HASH_B = "cd" * 32


def run(bin_dir, *args, env=None):
    return subprocess.run([os.path.join(bin_dir, "quiesce"), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def facts(mode=0o700, extra_mounts=()):
    return {
        "hostname": "web-1", "os_family": "linux", "guard_ready": True,
        "mounts": [
            {"mount_point": "/", "device": "/dev/vda1", "fs_type": "ext4", "freezable": True},
            {"mount_point": "/data", "device": "/dev/vdb", "fs_type": "xfs", "freezable": True},
            *extra_mounts,
        ],
        "hooks": [
            {"name": "prescript", "path": "/tmp/prescript.sh", "exists": True, "regular_file": True, "mode": mode,
             "sha256": HASH_A, "refusal": "HOOK_REFUSAL_NONE" if mode == 0o700 else "HOOK_REFUSAL_WRONG_MODE"},
            {"name": "postscript", "path": "/tmp/postscript.sh", "exists": True, "regular_file": True, "mode": 0o700,
             "sha256": HASH_B},
        ],
    }


def test_plugins_lists_the_builtins_with_their_options(bin_dir):
    result = run(bin_dir, "plugins")
    assert result.returncode == 0, result.stderr
    assert "crash" in result.stdout and "linux-freeze" in result.stdout
    assert "prescript_path" in result.stdout and "/tmp/prescript.sh" in result.stdout
    listing = json.loads(run(bin_dir, "plugins", "--output", "json").stdout)
    names = {p["info"]["name"]: p for p in listing["plugins"]}
    assert set(names) >= {"crash", "linux-freeze"} and listing["failures"] == []
    assert names["linux-freeze"]["abi"] == "1.0" and names["linux-freeze"]["path"].endswith("libquiesce-plugin-linux-freeze.so")


def test_a_broken_plugin_is_listed_with_its_reason_and_the_others_load(bin_dir, tmp_path):
    junk = tmp_path / "junk.so"
    junk.write_text("#!/bin/sh\n")
    result = run(bin_dir, "plugins", "--plugin-path", str(tmp_path))
    assert result.returncode == 1
    assert "linux-freeze" in result.stdout
    assert f"plugin {junk}: not-a-shared-object" in result.stdout


def test_plan_from_saved_facts_every_level_and_exit_code(bin_dir, tmp_path):
    good, loose, vfat = tmp_path / "good.json", tmp_path / "loose.json", tmp_path / "efi.json"
    good.write_text(json.dumps(facts()))
    loose.write_text(json.dumps(facts(mode=0o755)))
    vfat.write_text(json.dumps(facts(extra_mounts=[{"mount_point": "/boot/efi", "device": "/dev/vda15", "fs_type": "vfat",
                                                    "not_freezable_reason": "fs-not-eligible:vfat"}])))

    app = run(bin_dir, "plan", "--plugin", "linux-freeze", "--facts", str(good))
    assert app.returncode == 0, app.stdout + app.stderr
    assert "good: linux-freeze → application" in app.stdout
    assert "run-hook prescript sha256:abababababab" in app.stdout and "Nothing was frozen." in app.stdout

    both = run(bin_dir, "plan", "--plugin", "linux-freeze", "--facts", str(good), "--facts", str(loose), "--facts", str(vfat),
               "--output", "json")
    assert both.returncode == 2, both.stderr  # some downgraded, none below the minimum (crash)
    plans = {p["instance"]: p for p in json.loads(both.stdout)}
    assert plans["good"]["expected"] == "application"
    assert plans["loose"]["expected"] == "filesystem"
    assert plans["loose"]["plan"]["reasons"][0].startswith("prescript-wrong-mode: /tmp/prescript.sh has mode 0755")
    assert plans["efi"]["expected"] == "crash" and plans["efi"]["plan"]["reasons"][0].startswith("fs-not-eligible: /boot/efi is vfat")
    assert [s["id"] for s in plans["good"]["plan"]["quiesce"]] == ["prescript", "freeze"]

    strict = run(bin_dir, "plan", "--plugin", "linux-freeze", "--facts", str(loose), "--minimum", "application")
    assert strict.returncode == 3 and "FAILS: below the minimum application" in strict.stdout

    skipped = run(bin_dir, "plan", "--plugin", "linux-freeze", "--facts", str(vfat), "--option", "skip_mounts=/boot/efi")
    assert skipped.returncode == 0, skipped.stdout


def test_plan_usage_errors_say_what_was_expected(bin_dir, tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps(facts()))
    typo = run(bin_dir, "plan", "--plugin", "linux-freeze", "--facts", str(good), "--option", "fs_frezee=true")
    assert typo.returncode == 64 and "unknown option fs_frezee (linux-freeze accepts application_consistent" in typo.stderr
    wrong = run(bin_dir, "plan", "--plugin", "linux-freeze", "--facts", str(good), "--option", "retries=lots")
    assert wrong.returncode == 64 and 'option retries: expected integer, found "lots"' in wrong.stderr
    missing = run(bin_dir, "plan", "--plugin", "nope", "--facts", str(good))
    assert missing.returncode == 1 and "no plugin named nope" in missing.stderr and "linux-freeze" in missing.stderr
    levels = run(bin_dir, "plan", "--plugin", "crash", "--facts", str(good), "--wanted", "filesystem", "--minimum", "application")
    assert levels.returncode == 64 and "--minimum application is above --wanted filesystem" in levels.stderr
    bad = tmp_path / "bad.json"
    bad.write_text('{"mounts": 3}')
    broken = run(bin_dir, "plan", "--plugin", "linux-freeze", "--facts", str(bad))
    assert broken.returncode == 3 and "is not the JSON of quiesce.agent.v1.Facts" in broken.stdout


def test_plan_for_a_connected_agent_matches_its_saved_facts(bin_dir, engine, tmp_path):
    hooks = tmp_path / "hooks"
    hooks.mkdir(mode=0o700)
    for name in ("pre.sh", "post.sh"):
        path = hooks / name
        path.write_text("#!/bin/sh\nexit 0\n")
        os.chmod(path, 0o700)
    cert, key = engine.issue_agent("web-7")
    agent = subprocess.Popen(
        [os.path.join(bin_dir, "quiesce-agent"), "run", "--engine", f"127.0.0.1:{engine.port}", "--cert", cert, "--key", key,
         "--ca", os.path.join(engine.ca_dir, "ca.pem"), "--hook-dir", str(hooks),
         "--prescript", str(hooks / "pre.sh"), "--postscript", str(hooks / "post.sh"), "--log-level", "warning",
         "--syncfs-min-dirty-mib", "24"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert wait_for(lambda: "web-7" in engine.quiesce(["agents"], check=False).stdout, timeout=20), engine.logs()
        saved = engine.quiesce(["facts", "web-7", "--hook-hashes", "--output", "json"]).stdout
        facts = json.loads(saved)
        # The agent's syncfs rule is in its facts, for machines and people.
        assert facts["syncfs"] == "SYNCFS_POLICY_AUTO" and facts["syncfs_min_dirty_bytes"] == 24 << 20, saved
        table = engine.quiesce(["facts", "web-7"]).stdout
        assert "thaw guard ready; syncfs before FIFREEZE: auto (when 24 MiB or more of the page cache is dirty)" in table, table
        mounts = [m for m in facts["mounts"] if m.get("freezable")]
        assert mounts, "this machine has no freezable mount to plan for"
        target = mounts[0]["mount_point"]
        args = ["plan", "--plugin", "linux-freeze", "--option", f"only_mounts={target}",
                "--option", f"prescript_path={hooks / 'pre.sh'}", "--option", f"postscript_path={hooks / 'post.sh'}",
                "--output", "json"]
        live = engine.quiesce([*args, "--instance", "web-7"], check=False)
        assert live.returncode == 0, live.stdout + live.stderr
        plan = json.loads(live.stdout)[0]
        assert plan["instance"] == "web-7" and plan["expected"] == "application"
        steps = {s["id"]: s for s in plan["plan"]["quiesce"] + plan["plan"]["thaw"]}
        assert steps["freeze"]["action"]["freeze"]["mount_points"] == [target]
        assert len(steps["prescript"]["action"]["run_hook"]["hook"]["sha256"]) == 64  # pinned from the live facts

        saved_file = tmp_path / "web-7.json"
        saved_file.write_text(saved)
        offline = engine.quiesce([*args, "--facts", str(saved_file)], check=False)
        assert offline.returncode == 0, offline.stdout + offline.stderr
        assert json.loads(offline.stdout)[0]["plan"] == plan["plan"], "saved facts plan exactly like the live agent"

        absent = engine.quiesce(["plan", "--plugin", "crash", "--instance", "web-9"], check=False)
        assert absent.returncode == 3 and "web-9: cannot plan: not connected" in absent.stdout
    finally:
        agent.terminate()
        agent.wait(timeout=10)


def test_facts_and_plan_for_a_simulated_windows_instance(bin_dir, engine, tmp_path):
    """`quiesce facts` shows the writers, `quiesce plan` the VSS steps and the level per policy (nothing is frozen)."""
    (tmp_path / "c").mkdir()
    (tmp_path / "e").mkdir()
    scenario = tmp_path / "win.json"
    scenario.write_text(json.dumps({
        "hostname": "win-7", "os_name": "Microsoft Windows Server 2022 Datacenter", "os_version": "10.0.20348",
        "volumes": [{"name": "C:\\", "fs_type": "NTFS", "path": str(tmp_path / "c")},
                    {"name": "E:\\", "fs_type": "FAT32", "path": str(tmp_path / "e")}],
        "writers": [{"name": "SqlServerWriter", "id": "a65faa63-5ea8-4ebc-9dbd-a0c4db26912a", "components": ["sales"]},
                    {"name": "Registry Writer"}],
    }))
    cert, key = engine.issue_agent("win-7")
    agent = subprocess.Popen(
        [os.path.join(bin_dir, "quiesce-agent"), "run", "--engine", f"127.0.0.1:{engine.port}", "--cert", cert, "--key", key,
         "--ca", os.path.join(engine.ca_dir, "ca.pem"), "--vss-simulator", str(scenario), "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert wait_for(lambda: "win-7" in engine.quiesce(["agents"], check=False).stdout, timeout=20), engine.logs()
        table = engine.quiesce(["facts", "win-7"]).stdout
        assert "win-7: Microsoft Windows Server 2022 Datacenter 10.0.20348" in table, table
        assert "VSS service running; hold guard ready; 2 writers" in table, table
        assert "SqlServerWriter" in table and "a65faa63-5ea8-4ebc-9dbd-a0c4db26912a" in table and "STABLE (1)" in table, table
        assert "VOLUME" in table and "fs-not-eligible:FAT32" in table, table

        # E:\ is FAT32: the plan says so; skipped, the instance is application-consistent through VSS writers.
        first = engine.quiesce(["plan", "--plugin", "windows-vss", "--instance", "win-7"], check=False)
        assert first.returncode == 2, first.stdout + first.stderr
        assert "win-7: windows-vss → crash" in first.stdout and "fs-not-eligible: E:\\ is FAT32" in first.stdout, first.stdout
        good = engine.quiesce(["plan", "--plugin", "windows-vss", "--instance", "win-7", "--option", "skip_volumes=E:\\"], check=False)
        assert good.returncode == 0, good.stdout + good.stderr
        assert "win-7: windows-vss → application" in good.stdout
        assert "vss-freeze C:\\ (writers, copy, hold ≤ 10000 ms)" in good.stdout, good.stdout
        assert "proof: the thaw reply names this freeze and its snapshot set" in good.stdout, good.stdout
        off = engine.quiesce(["plan", "--plugin", "windows-vss", "--instance", "win-7", "--option", "skip_volumes=E:\\",
                              "--option", "vss_writers=false", "--output", "json"], check=False)
        assert off.returncode == 2
        plan = json.loads(off.stdout)[0]
        assert plan["expected"] == "filesystem" and plan["plan"]["reasons"][0].startswith("vss-writers-off: ")
        assert "include_writers" not in plan["plan"]["quiesce"][0]["action"]["vss_freeze"]
        # The Linux plugin refuses a Windows instance, with the reason.
        linux = engine.quiesce(["plan", "--plugin", "linux-freeze", "--instance", "win-7"], check=False)
        assert linux.returncode == 3 and "plans for linux instances; win-7 is windows" in linux.stdout, linux.stdout
    finally:
        agent.terminate()
        agent.wait(timeout=10)
