#!/usr/bin/env bash
# Download the non-torch dependencies as wheels into wheels/ (ignored by git) for a machine with
# no package index (the lent GPU machine), for the Python versions it may have. numpy is left
# out (the machine has it beside PyTorch): carry is limited to 64 MiB.
set -eu
mkdir -p wheels
for v in 3.10 3.11 3.12 3.13; do
    python3 -m pip download --quiet --dest wheels --only-binary=:all: --python-version "$v" \
        click "protobuf>=7.35.1" lmdb tqdm pillow || echo "some wheels missing for $v"
done
ls wheels
