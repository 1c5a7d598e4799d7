#!/usr/bin/env bash
# Prepare what a lent GPU machine needs beside the checkout (it has PyTorch and CUDA but no
# package index, and ../shared does not travel): the non-torch dependencies as wheels in wheels/
# for the Python versions it may have, and a copy of ../shared/refs and ../shared/seeds in
# device_shared/. Both folders are ignored by git; name them in the device call's `carry`
# (["wheels", "device_shared"]). numpy is left out (the machine has it beside PyTorch): carry is
# limited to 64 MiB with the working tree.
set -eu
mkdir -p wheels
for v in 3.10 3.11 3.12 3.13; do
    python3 -m pip download --quiet --dest wheels --only-binary=:all: --python-version "$v" \
        click "protobuf>=7.35.1" lmdb tqdm pillow || echo "some wheels missing for $v"
done
rm -rf device_shared
mkdir -p device_shared
cp -r ../shared/refs ../shared/seeds device_shared/
du -sh wheels device_shared
