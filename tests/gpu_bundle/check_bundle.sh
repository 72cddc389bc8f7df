#!/usr/bin/env bash
# Checks a bundle of scripts/gpu-bundle.sh on a machine without a GPU (CTest: tests/gpu_bundle/tests.cmake).
#   check_bundle.sh empty-env BUNDLE   each binary starts with an empty environment and only the
#                                      bundle's library folder (env -i LD_LIBRARY_PATH=BUNDLE/lib)
#   check_bundle.sh skips BUNDLE       the test binary, from the bundle, finds its data through
#                                      QLORA_SOURCE_DIR (a data test passes, and fails when it points
#                                      nowhere) and its GPU suites skip with their "no GPU" message
#   check_bundle.sh libs BUNDLE        every library ldd reports is in BUNDLE/lib, except those
#                                      expected on the GPU machine (docs/gpu.md: glibc's own, the
#                                      CUDA driver, cuBLAS), and none of those is bundled
set -euo pipefail
what=${1:?usage: check_bundle.sh empty-env|skips|libs BUNDLE}
b=${2:?usage: check_bundle.sh empty-env|skips|libs BUNDLE}
b=$(cd "$b" && pwd)
fail() { echo "FAIL: $*" >&2; exit 1; }
for t in qlora qlora_tests bench_cuda_ops bench_cuda_train; do
  [ -x "$b/bin/$t" ] || fail "$b/bin/$t missing"
done

# The list of docs/gpu.md, written out again on purpose (not read from scripts/gpu-bundle.sh).
expected_on_host() {
  case "$1" in
    linux-vdso.so.*|ld-linux*.so.*|libc.so.*|libm.so.*|libpthread.so.*|libdl.so.*|librt.so.*) return 0 ;;
    libresolv.so.*|libutil.so.*|libanl.so.*|libmvec.so.*) return 0 ;;
    libcuda.so.*|libnvidia-*.so*) return 0 ;;
    libcublas.so.*|libcublasLt.so.*) return 0 ;;
  esac
  return 1
}

case "$what" in
  empty-env)
    v=$(env -i LD_LIBRARY_PATH="$b/lib" "$b/bin/qlora" --version) || fail "qlora --version failed"
    [[ "$v" == qlora\ * ]] || fail "qlora --version printed '$v'"
    echo "qlora --version: $v"
    for t in bench_cuda_ops bench_cuda_train; do
      env -i LD_LIBRARY_PATH="$b/lib" "$b/bin/$t" --help >/dev/null || fail "$t --help failed"
      echo "$t --help: ok"
    done
    n=$(env -i LD_LIBRARY_PATH="$b/lib" "$b/bin/qlora_tests" --gtest_list_tests | grep -c '^Cuda') ||
      fail "qlora_tests --gtest_list_tests failed"
    [ "$n" -gt 0 ] || fail "qlora_tests lists no Cuda* suite"
    echo "qlora_tests --gtest_list_tests: $n Cuda* suites"
    ;;
  skips)
    run() {  # the bundle's test binary as gpu-check.sh runs it, GPU hidden
      env -i LD_LIBRARY_PATH="$b/lib" HOME="$tmp" QLORA_CACHE="$tmp/cache" CUDA_VISIBLE_DEVICES= \
        OMP_WAIT_POLICY=passive QLORA_BINARY="$b/bin/qlora" "$@"
    }
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    # Data: the golden quantization file, read through QLORA_SOURCE_DIR.
    run QLORA_SOURCE_DIR="$b/src" "$b/bin/qlora_tests" --gtest_filter='QuantGolden.*' >"$tmp/golden.log" 2>&1 ||
      { cat "$tmp/golden.log"; fail "QuantGolden.* failed with QLORA_SOURCE_DIR=$b/src"; }
    grep -q '^\[  PASSED  \] [1-9]' "$tmp/golden.log" || { cat "$tmp/golden.log"; fail "no QuantGolden test passed"; }
    if run QLORA_SOURCE_DIR="$tmp/nowhere" "$b/bin/qlora_tests" --gtest_filter='QuantGolden.*' >"$tmp/nowhere.log" 2>&1; then
      fail "QuantGolden.* passed with QLORA_SOURCE_DIR pointing nowhere: the override is not read"
    fi
    echo "QLORA_SOURCE_DIR: the golden tests read the bundle's data (and fail without it)"
    # A GPU suite and the CLI's backend checks: skipped with the reason, nothing failed.
    run QLORA_SOURCE_DIR="$b/src" "$b/bin/qlora_tests" --gtest_filter='CudaOps.*:CudaModel.*:Backend.*' \
      >"$tmp/gpu.log" 2>&1 || { cat "$tmp/gpu.log"; fail "the GPU suites failed without a GPU"; }
    grep -q 'no GPU: ' "$tmp/gpu.log" || { cat "$tmp/gpu.log"; fail "no 'no GPU: ' skip message"; }
    grep -q '^\[  SKIPPED \] [1-9]' "$tmp/gpu.log" || { cat "$tmp/gpu.log"; fail "nothing skipped"; }
    grep -m1 'no GPU: ' "$tmp/gpu.log"
    grep -E '^\[  (PASSED  |SKIPPED )\] [0-9]+' "$tmp/gpu.log"
    ;;
  libs)
    status=0
    for f in "$b"/lib/*; do
      if expected_on_host "$(basename "$f")"; then
        echo "FAIL: $f is bundled but must come from the GPU machine" >&2
        status=1
      fi
    done
    for t in "$b"/bin/*; do
      while read -r name path; do
        case "$path" in
          "$b"/lib/*) ;;
          *) if ! expected_on_host "$name"; then
               echo "FAIL: $(basename "$t") loads $name from ${path/not/nowhere (not found)}, outside the bundle" >&2
               status=1
             fi ;;
        esac
      done < <(env -i LD_LIBRARY_PATH="$b/lib" ldd "$t" |
               awk '$2 == "=>" { print $1, $3; next } NF >= 1 { n = $1; sub(".*/", "", n); print n, $1 }')
    done
    [ "$status" -eq 0 ] || exit 1
    echo "every library of bin/* is in lib/ ($(find "$b/lib" -type f | wc -l) files) or expected on the GPU machine"
    ;;
  *) fail "unknown check '$what'" ;;
esac
