#!/bin/sh
# Make DIR (default ~/.cache/fxforge/arm64-qemu) for an emulated AArch64 TVM RPC server:
#   DIR/sysroot  Debian's arm64 python3.11 and the libraries it links, unpacked (no arm64 packages installed)
#   DIR/site     the AArch64 wheels of apache-tvm and what it imports, unpacked
# then: fxforge rpc server --tracker HOST:PORT --key arm64-qemu --qemu-root DIR
# Needs root for `dpkg --add-architecture arm64` and `apt-get update` (it adds the arm64 package lists), a
# Debian bookworm-like system, qemu-user (apt-get install qemu-user) and pip; about 60 MB of downloads.
set -eu
DIR=${1:-${XDG_CACHE_HOME:-$HOME/.cache}/fxforge/arm64-qemu}
PYTHON=${PYTHON:-python3}
mkdir -p "$DIR/debs" "$DIR/sysroot" "$DIR/site" "$DIR/wheels"
dpkg --print-foreign-architectures | grep -qx arm64 || dpkg --add-architecture arm64
apt-get update -q
cd "$DIR/debs"
apt-get download python3.11-minimal:arm64 libpython3.11-minimal:arm64 libpython3.11-stdlib:arm64 \
  libc6:arm64 libstdc++6:arm64 libgcc-s1:arm64 zlib1g:arm64 libffi8:arm64 libexpat1:arm64 libssl3:arm64 \
  libbz2-1.0:arm64 liblzma5:arm64 libsqlite3-0:arm64 libncursesw6:arm64 libtinfo6:arm64 libreadline8:arm64 \
  libuuid1:arm64 libcrypt1:arm64 libnsl2:arm64 libtirpc3:arm64 libgssapi-krb5-2:arm64 libkrb5-3:arm64 \
  libk5crypto3:arm64 libkrb5support0:arm64 libcom-err2:arm64 libkeyutils1:arm64 libdb5.3:arm64
for deb in *.deb; do dpkg -x "$deb" "$DIR/sysroot"; done
"$PYTHON" -m pip download --no-deps --platform manylinux_2_28_aarch64 --python-version 3.11 --only-binary=:all: \
  -d "$DIR/wheels" apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post1 numpy ml_dtypes psutil cloudpickle \
  typing_extensions
for wheel in "$DIR"/wheels/*.whl; do "$PYTHON" -m zipfile -e "$wheel" "$DIR/site"; done
qemu-aarch64 -L "$DIR/sysroot" "$DIR/sysroot/usr/bin/python3.11" -c "import platform; print(platform.machine())"
echo "$DIR is ready"
