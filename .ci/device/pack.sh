#!/bin/bash
# Prepares, on this machine, what the GPU check needs on a lent device machine, which has no
# network. Run from anywhere in the repository; everything goes into .device/ (git-ignored),
# which the device tool's `run` carries beside the working tree:
#   run(command: "bash .ci/device/check.sh", carry: [".device"], timeout_s: 540)
# .device/ holds Deno (xz); a Deno cache of every npm package in deno.lock (xz; without source
# maps and the three onnxruntime-web engines aha never loads), so that `deno run main.ts` and
# `deno test` work offline there as here; and Debian's Vulkan/EGL loader packages, which that
# machine lacks. What travels is limited to 64 MiB; this prints the total.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.device/' .git/info/exclude 2>/dev/null || echo '/.device/' >> .git/info/exclude
rm -rf .device && mkdir -p .device/gl

xz -T2 -6 -c "$(readlink -f "$(command -v deno)")" > .device/deno.xz

cache=$(mktemp -d)
DENO_DIR=$cache deno cache main.ts tests/*.ts >/dev/null 2>&1 || { echo "pack: deno cache failed"; exit 1; }
tar -C "$cache" -cJf .device/npm.tar.xz --exclude='*.map' --exclude='*.jsep.wasm' \
  --exclude='*.jspi.wasm' --exclude='*.asyncify.wasm' npm
rm -rf "$cache"

o='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64'
mkdir -p /tmp/amd64/partial && apt-get $o update >/dev/null 2>&1
(cd .device/gl && apt-get $o download libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2 >/dev/null 2>&1)

tree=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
carried=$(du -sb .device | cut -f1)
echo "pack: .device $((carried / 1048576)) MiB + working tree $((tree / 1048576)) MiB (64 MiB travel)"
