#!/usr/bin/env bash
# Regenerates the Swift code for proto/ into Sources/QuiesceProto and rewrites
# its MANIFEST (proto hashes, generator versions, output hashes).
#
# Building the two protoc plugins takes minutes, so CI does not run this: it
# runs scripts/check-proto.sh, which checks the MANIFEST against the tree.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v protoc >/dev/null || { echo "gen-proto: protoc not found (apt-get install protobuf-compiler)" >&2; exit 1; }
swift build --product protoc-gen-swift >/dev/null
swift build --product protoc-gen-grpc-swift-2 >/dev/null
bin=$(swift build --show-bin-path)

# The plugin contract goes to its own target with messages only (no gRPC), so
# plugins written in Swift link SwiftProtobuf and nothing else.
plugin_out=Sources/QuiescePluginProto
rm -f "$plugin_out"/*.pb.swift
mapfile -t plugin_protos < <(cd proto && find quiesce/plugin -name '*.proto' | LC_ALL=C sort)
protoc --proto_path=proto \
  --plugin=protoc-gen-swift="$bin/protoc-gen-swift" \
  --swift_out="$plugin_out" --swift_opt=Visibility=Public --swift_opt=FileNaming=PathToUnderscores \
  "${plugin_protos[@]}"

out=Sources/QuiesceProto
rm -f "$out"/*.pb.swift "$out"/*.grpc.swift
mapfile -t protos < <(cd proto && find . -name '*.proto' -not -path './quiesce/plugin/*' | sed 's|^\./||' | LC_ALL=C sort)
protoc --proto_path=proto \
  --plugin=protoc-gen-swift="$bin/protoc-gen-swift" \
  --swift_out="$out" --swift_opt=Visibility=Public --swift_opt=FileNaming=PathToUnderscores \
  --plugin=protoc-gen-grpc-swift-2="$bin/protoc-gen-grpc-swift-2" \
  --grpc-swift-2_out="$out" --grpc-swift-2_opt=Visibility=Public --grpc-swift-2_opt=FileNaming=PathToUnderscores \
  "${protos[@]}"

scripts/check-proto.sh --write
