#!/usr/bin/env bash
# Packs everything a GPU machine needs to test and benchmark qlora without building anything there
# (docs/gpu.md): on a machine with nvcc and no GPU, builds (Release, CUDA archs 90) qlora, qlora_tests,
# bench_cuda_ops and bench_cuda_train, and writes
#   gpu-bundle/          the bundle, ready to run (scripts/gpu-check.sh runs from it)
#     bin/               the four binaries (stripped)
#     lib/               every shared library they load except glibc's own, the CUDA driver and cuBLAS
#     src/               the test data (tests/reference, tests/data, recipes) and bench/ (shapes.json,
#                        hf_baseline.py, gpu_bench.sh): what QLORA_SOURCE_DIR points the tests at
#     wheels/            a bitsandbytes wheel for Python 3.12 (pinned, only its CUDA 13 and CPU libraries)
#     gpu-check.sh, BUNDLE.txt (what was built from what, which libraries are in and which are expected)
#   gpu-bundle.tar.xz    the same, packed: what travels to the GPU machine (at most 60 MiB, checked)
#
# Usage: scripts/gpu-bundle.sh [--archs "90"] [--build-dir DIR] [--no-build] [--out DIR]
#                              [--no-wheel | --wheel FILE] [--no-archive] [--max-mib N] [-j N]
#   --archs A        CUDA architectures (CMake's QLORA_CUDA_ARCHS; default 90: H100/H200)
#   --build-dir DIR  package this configured build (its QLORA_CUDA_ARCHS must hold every arch of
#                    --archs) instead of the default build-bundle/ made here for --archs; the four
#                    targets are brought up to date in it unless --no-build
#   --no-build       package the binaries as they are (CI's tests: the build just made them)
#   --out DIR        the bundle folder (default gpu-bundle; the archive is DIR.tar.xz)
#   --no-wheel       no bitsandbytes wheel (the baseline then runs with a bf16 base)
#   --wheel FILE     this bitsandbytes wheel instead of downloading the pinned one with pip
#   --no-archive     only the folder (no DIR.tar.xz)
#   --max-mib N      the archive's limit (default 60)
# Environment: CCACHE_BASEDIR (default: the checkout), PYTHON (default python3), XZ_OPT (default -6 -T0).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)

BNB_VERSION=0.50.2  # bitsandbytes: CUDA 13 libraries (libbitsandbytes_cuda130.so), torch >= 2.4
TARGETS=(qlora qlora_tests bench_cuda_ops bench_cuda_train)
# Where each target lands in a CMake build folder.
declare -A TARGET_PATH=([qlora]=qlora [qlora_tests]=tests/qlora_tests [bench_cuda_ops]=bench/bench_cuda_ops
                        [bench_cuda_train]=bench/bench_cuda_train)

archs="90"
build_dir=""
do_build=1
out="$repo/gpu-bundle"
wheel=download
wheel_file=""
archive=1
max_mib=60
jobs=$(nproc)
python=${PYTHON:-python3}

die() { echo "gpu-bundle: $*" >&2; exit 1; }
while [ $# -gt 0 ]; do
  case "$1" in
    --archs) archs=${2:?--archs needs a value}; shift ;;
    --build-dir) build_dir=${2:?--build-dir needs a folder}; shift ;;
    --no-build) do_build=0 ;;
    --out) out=${2:?--out needs a folder}; shift ;;
    --no-wheel) wheel=none ;;
    --wheel) wheel="file"; wheel_file=${2:?--wheel needs a file}; shift ;;
    --no-archive) archive=0 ;;
    --max-mib) max_mib=${2:?--max-mib needs a number}; shift ;;
    -j) jobs=${2:?-j needs a number}; shift ;;
    -h|--help) sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done
[[ "$max_mib" =~ ^[0-9]+$ ]] || die "--max-mib: expected a number of MiB, got '$max_mib'"
archs=${archs//,/;}
case "$out" in /*) ;; *) out="$PWD/$out" ;; esac
out=${out%/}
if [ "$out" = "$repo" ] || [ "$out" = / ]; then die "--out must be a folder of its own, not '$out'"; fi
if [ -n "$wheel_file" ]; then
  [ -f "$wheel_file" ] || die "--wheel: no file '$wheel_file'"
  wheel_file=$(cd "$(dirname "$wheel_file")" && pwd)/$(basename "$wheel_file")
fi
t_start=$(date +%s)

# ---- 1. the build ----------------------------------------------------------------------------
if [ -z "$build_dir" ]; then
  build_dir="$repo/build-bundle"
  if [ "$do_build" -eq 1 ]; then
    command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ] ||
      die "nvcc not found: the bundle needs the CUDA toolkit (CUDA 13) to build"
    cmake_args=(-S "$repo" -B "$build_dir" -DCMAKE_BUILD_TYPE=Release -DQLORA_CUDA=ON
                "-DQLORA_CUDA_ARCHS=$archs")
    if command -v ninja >/dev/null 2>&1 && { [ ! -f "$build_dir/CMakeCache.txt" ] ||
                                             grep -q '^CMAKE_GENERATOR:INTERNAL=Ninja$' "$build_dir/CMakeCache.txt"; }; then
      cmake_args+=(-G Ninja)
    fi
    if command -v ccache >/dev/null 2>&1; then
      export CCACHE_BASEDIR=${CCACHE_BASEDIR:-$repo}
      cmake_args+=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache)
    fi
    echo "gpu-bundle: configuring $build_dir (Release, CUDA archs $archs)"
    cmake "${cmake_args[@]}" >/dev/null
  fi
fi
case "$build_dir" in /*) ;; *) build_dir="$PWD/$build_dir" ;; esac
[ -f "$build_dir/CMakeCache.txt" ] || die "$build_dir is not a configured CMake build (no CMakeCache.txt)"
cache_value() { sed -n "s/^$1:[A-Z]*=//p" "$build_dir/CMakeCache.txt" | head -n 1; }
built_archs=$(cache_value QLORA_CUDA_ARCHS)
build_type=$(cache_value CMAKE_BUILD_TYPE)
[ -n "$built_archs" ] || die "$build_dir has no QLORA_CUDA_ARCHS: not a qlora build?"
IFS=';' read -r -a want_archs <<<"$archs"
IFS=';' read -r -a have_archs <<<"$built_archs"
for a in "${want_archs[@]}"; do
  found=0
  for h in "${have_archs[@]}"; do [ "${h%%-*}" = "${a%%-*}" ] && found=1; done
  [ "$found" -eq 1 ] || die "$build_dir builds CUDA archs '$built_archs', not $a: configure it with \
-DQLORA_CUDA_ARCHS=\"$built_archs;$a\", or leave out --build-dir to build $build_dir for '$archs' here"
done
[ "$build_type" = Release ] || echo "gpu-bundle: warning: $build_dir is a '$build_type' build, not Release: timings will be off" >&2
if [ "$do_build" -eq 1 ]; then
  echo "gpu-bundle: building ${TARGETS[*]} in $build_dir (-j $jobs)"
  t0=$(date +%s)
  cmake --build "$build_dir" -j "$jobs" --target "${TARGETS[@]}"
  echo "gpu-bundle: build took $(( $(date +%s) - t0 )) s"
fi
for t in "${TARGETS[@]}"; do
  [ -x "$build_dir/${TARGET_PATH[$t]}" ] ||
    die "$build_dir/${TARGET_PATH[$t]} is missing (a build without CUDA? build it, or drop --no-build)"
done

# ---- 2. the folder, made under a temporary name and renamed when complete ----------------------
tmp="$out.tmp-$$"
# shellcheck disable=SC2317  # called by the trap
cleanup() { rm -rf "$tmp" "$out.tar.xz.tmp-$$"; }
trap cleanup EXIT
rm -rf "$tmp"
mkdir -p "$tmp/bin" "$tmp/lib" "$tmp/src/tests" "$tmp/src/bench" "$tmp/wheels"

for t in "${TARGETS[@]}"; do
  cp "$build_dir/${TARGET_PATH[$t]}" "$tmp/bin/$t"
  # Symbols only (Release has no debug info): about a tenth of each binary.
  if command -v strip >/dev/null 2>&1; then strip --strip-unneeded "$tmp/bin/$t"; fi
done

# Libraries: everything ldd resolves, except
#   glibc's own (libc, libm, libpthread, libdl, librt, libresolv, libutil, libanl, libmvec, the
#     loader, the vDSO): every Linux machine has them, and they must match its loader;
#   the CUDA driver (libcuda, libnvidia-*): it comes with the GPU's kernel driver and must match it;
#   cuBLAS (libcublas, libcublasLt: 52 + 517 MiB, far over the budget; no static cuBLAS in CUDA 13):
#     the GPU machine's CUDA 13 provides it (scripts/gpu-check.sh finds it).
# tests/gpu_bundle/check_bundle.sh checks the bundle against the same list (docs/gpu.md).
expected_on_host() {
  case "$1" in
    linux-vdso.so.*|ld-linux*.so.*|libc.so.*|libm.so.*|libpthread.so.*|libdl.so.*|librt.so.*) return 0 ;;
    libresolv.so.*|libutil.so.*|libanl.so.*|libmvec.so.*) return 0 ;;
    libcuda.so.*|libnvidia-*.so*) return 0 ;;
    libcublas.so.*|libcublasLt.so.*) return 0 ;;
  esac
  return 1
}
declare -A bundled=() expected=()
for t in "${TARGETS[@]}"; do
  while read -r name path; do
    [ -n "$name" ] || continue
    if [ "$path" = "not" ]; then die "ldd: $t needs $name, which is not found on this machine"; fi
    if expected_on_host "$name"; then expected[$name]=1; continue; fi
    if [ -z "${bundled[$name]:-}" ]; then
      cp -L "$path" "$tmp/lib/$name"
      chmod 0644 "$tmp/lib/$name"
      bundled[$name]=$(readlink -f "$path")
    fi
  done < <(ldd "$build_dir/${TARGET_PATH[$t]}" |
           awk '$2 == "=>" { print $1, $3; next } NF >= 1 { n = $1; sub(".*/", "", n); print n, $1 }')
done

# The test data the GPU suites read (QLORA_SOURCE_DIR), the baseline and its shapes.
cp -r "$repo/recipes" "$tmp/src/recipes"
mkdir -p "$tmp/src/tests/reference"
cp "$repo"/tests/reference/*.safetensors "$repo"/tests/reference/*.json "$tmp/src/tests/reference/"
cp -r "$repo/tests/data" "$tmp/src/tests/data"
cp "$repo/bench/hf_baseline.py" "$repo/bench/shapes.json" "$repo/bench/gpu_bench.sh" "$tmp/src/bench/"
cp "$repo/scripts/gpu-check.sh" "$tmp/gpu-check.sh"
chmod +x "$tmp/gpu-check.sh" "$tmp/src/bench/gpu_bench.sh" "$tmp/src/bench/hf_baseline.py"

# ---- 3. the bitsandbytes wheel: the pinned release, less the libraries of other CUDA versions ----
wheel_note="none (--no-wheel): the baseline runs with a bf16 base"
if [ "$wheel" != none ]; then
  if [ "$wheel" = download ]; then
    cache="${XDG_CACHE_HOME:-$HOME/.cache}/qlora/wheels"
    mkdir -p "$cache"
    shopt -s nullglob
    cached=("$cache"/bitsandbytes-"$BNB_VERSION"-*manylinux*x86_64.whl)
    if [ ${#cached[@]} -eq 0 ]; then
      echo "gpu-bundle: downloading bitsandbytes $BNB_VERSION (Python 3.12, manylinux x86_64) into $cache"
      "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        -d "$cache" "bitsandbytes==$BNB_VERSION" ||
        die "pip download of bitsandbytes==$BNB_VERSION failed: give a wheel with --wheel FILE, or --no-wheel"
      cached=("$cache"/bitsandbytes-"$BNB_VERSION"-*manylinux*x86_64.whl)
      [ ${#cached[@]} -gt 0 ] || die "pip saved no bitsandbytes $BNB_VERSION manylinux x86_64 wheel in $cache"
    fi
    shopt -u nullglob
    wheel_file=${cached[0]}
  fi
  # The wheel holds libraries for CUDA 11.8-13.2, ROCm and XPU (129 MiB unpacked, 41 MiB packed);
  # bitsandbytes loads the one of torch.version.cuda (13.0 there). Keep CUDA 13.x and the CPU one,
  # rewrite RECORD to match: still a valid wheel for `pip install`.
  "$python" - "$wheel_file" "$tmp/wheels/$(basename "$wheel_file")" <<'PY'
import re, sys, zipfile
src, dst = sys.argv[1], sys.argv[2]
drop = re.compile(r"bitsandbytes/libbitsandbytes_(?!cuda13\d|cpu)[^/]*\.so$")
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
    names = [i.filename for i in zin.infolist()]
    if not any(re.search(r"libbitsandbytes_cuda13\d\.so$", n) for n in names):
        sys.exit("gpu-bundle: %s has no CUDA 13 library (libbitsandbytes_cuda13x.so)" % src)
    for info in zin.infolist():
        if drop.search(info.filename):
            continue
        data = zin.read(info.filename)
        if info.filename.endswith(".dist-info/RECORD"):
            lines = data.decode().splitlines(True)
            data = "".join(l for l in lines if not drop.search(l.split(",", 1)[0])).encode()
        zout.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
PY
  wheel_note="$(basename "$wheel_file") (bitsandbytes $BNB_VERSION; only libbitsandbytes_cuda13x.so and _cpu.so kept)"
fi

# ---- 4. what is in it -------------------------------------------------------------------------
commit=$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ "$commit" != unknown ] && ! git -C "$repo" diff --quiet HEAD -- 2>/dev/null; then
  commit="$commit (+ uncommitted changes)"
fi
nvcc_bin=$(cache_value CMAKE_CUDA_COMPILER)
[ -n "$nvcc_bin" ] || nvcc_bin=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
nvcc_version=$("$nvcc_bin" --version 2>/dev/null | sed -n 's/.*release \([0-9.]*\), \(V[0-9.]*\).*/\1 (\2)/p' || true)
{
  echo "qlora GPU bundle (scripts/gpu-bundle.sh; docs/gpu.md)"
  # shellcheck disable=SC1091
  echo "made:          $(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(uname -n) ($(. /etc/os-release 2>/dev/null && echo "$PRETTY_NAME"), glibc $(ldd --version | sed -n '1s/.* //p'))"
  echo "commit:        $commit"
  echo "build:         $build_dir ($build_type, QLORA_CUDA_ARCHS=$built_archs), nvcc ${nvcc_version:-unknown}"
  echo "binaries:      ${TARGETS[*]} (bin/, stripped)"
  echo "bundled (lib/):"
  for n in $(printf '%s\n' "${!bundled[@]}" | sort); do echo "  $n <- ${bundled[$n]}"; done
  echo "expected on the GPU machine (not bundled):"
  for n in $(printf '%s\n' "${!expected[@]}" | sort); do echo "  $n"; done
  echo "  (glibc >= $(ldd --version | sed -n '1s/.* //p'), the NVIDIA driver for CUDA 13 (libcuda.so.1), cuBLAS 13 (libcublas.so.13, libcublasLt.so.13))"
  echo "wheel:         $wheel_note"
} >"$tmp/BUNDLE.txt"

rm -rf "$out"
mv "$tmp" "$out"
unpacked=$(du -sb "$out" | cut -f1)
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }

status=0
if [ "$archive" -eq 1 ]; then
  # xz: the libraries and binaries shrink to about a fifth (OpenBLAS 35 -> 4 MiB, ICU data 30 -> 7).
  echo "gpu-bundle: packing $out.tar.xz"
  XZ_OPT=${XZ_OPT:--6 -T0} tar -C "$(dirname "$out")" -cJf "$out.tar.xz.tmp-$$" "$(basename "$out")"
  mv "$out.tar.xz.tmp-$$" "$out.tar.xz"
  packed=$(stat -c %s "$out.tar.xz")
  if [ "$packed" -gt $((max_mib * 1048576)) ]; then
    echo "gpu-bundle: $out.tar.xz is $(mib "$packed") MiB, over the limit of $max_mib MiB" >&2
    status=1
  fi
else
  rm -f "$out.tar.xz"
fi

echo
sed -n '/^bundled/,$p' "$out/BUNDLE.txt"
echo
echo "gpu-bundle: $out: $(mib "$unpacked") MiB unpacked (bin $(mib "$(du -sb "$out/bin" | cut -f1)"), lib $(mib "$(du -sb "$out/lib" | cut -f1)"), src $(mib "$(du -sb "$out/src" | cut -f1)"), wheels $(mib "$(du -sb "$out/wheels" | cut -f1)") MiB)"
if [ "$archive" -eq 1 ]; then
  echo "gpu-bundle: $out.tar.xz: $(mib "$packed") MiB (limit $max_mib MiB): carry it to the GPU machine (docs/gpu.md)"
  # What else travels with it through the device tool: the working tree (tracked + untracked files
  # that git does not ignore), 64 MiB in all.
  if tree_bytes=$(git -C "$repo" ls-files -co --exclude-standard -z 2>/dev/null |
                  (cd "$repo" && du -cb --files0-from=- 2>/dev/null) | tail -n 1 | cut -f1) && [ -n "$tree_bytes" ]; then
    echo "gpu-bundle: with the working tree ($(mib "$tree_bytes") MiB) that makes $(mib $((tree_bytes + packed))) MiB of the device tool's 64 MiB"
  fi
fi
echo "gpu-bundle: done in $(( $(date +%s) - t_start )) s"
exit $status
