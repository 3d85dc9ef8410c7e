#!/usr/bin/env bash
# GPU figures in one command, on Keras' JAX backend: no TensorFlow needed.
#
#   bash benchmarks/gpu.sh            # a machine with an NVIDIA GPU and JAX with CUDA, ~7 min
#   bash benchmarks/gpu.sh --quick    # tiny settings, any CPU: checks the script end to end
#
# Runs, each under its own time limit so that the whole ends within 8 minutes:
#   mixed_float16, mixed_bfloat16   python main.py --recipe=mixed_precision --compare, each
#                                   against float32 from the same weights
#   device                          the same job on the CPU and the GPU, with the cost verdict
#   batch                           a sweep to batch sizes a GPU likes (256 to 8192), with
#                                   the drop-in recipes/batch.py (benchmarks/gpu_batch.py)
#   advise                          advise on its default CNN, with the time-to-accuracy proof
# then prints one table (benchmarks/gpu_table.py): a row per step from its metrics.json.
#
# Keras, and the two packages it needs that a JAX-only machine may lack (namex, optree), are
# installed into a temporary folder from benchmarks/wheels when `import keras` fails; nothing
# is downloaded there. The wheels are not committed: fetch them where the package registry is
# reachable with `bash benchmarks/fetch_wheels.sh` (keras as pinned in requirements.txt, for
# Python 3.12 on x86-64 Linux) and carry the folder with the script. The rest (jax, numpy,
# absl-py, h5py, ml-dtypes, rich, pillow, tensorboard, psutil) must be there already.
#
# Environment: PYTHON (default python3), GPU_SH_LOGDIR (default: a new temp folder; each
# step's log and run folder go there).
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LOGDIR=${GPU_SH_LOGDIR:-$(mktemp -d -t gpu_sh.XXXXXX)}
mkdir -p "$LOGDIR"
export KERAS_BACKEND=jax PYTHONUNBUFFERED=1
begin=$(date +%s)

if ! "$PYTHON" -c "import keras" >/dev/null 2>&1; then
    site="$LOGDIR/site"
    if ! "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$site" \
            benchmarks/wheels/*.whl; then
        echo "error: keras is not installed, and benchmarks/wheels holds no wheels that install" \
             "on $("$PYTHON" --version 2>&1): run bash benchmarks/fetch_wheels.sh where the" \
             "package registry is reachable and carry the folder here" >&2
        exit 2
    fi
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi

if [ "${1:-}" = "--quick" ]; then  # seconds, not minutes: the script's mechanics only
    MP="--epochs=1 --steps_per_epoch=3 --batch_size=16 --filters=8,16 --dense_units=16"
    DEVICE="--epochs=1 --batch_size=1000"
    BATCH="--batch_sizes=32,64 --epochs=1 --examples=512"
    ADVISE="--image_size=16 --budget_s=6 --repeats=1 --proof_epochs=1 --max_batch_size=32"
    LIMITS=(120 120 120 120 240)
else
    MP=""
    DEVICE="--batch_size=1000"
    BATCH="--batch_sizes=256,1024,4096,8192 --epochs=3"
    ADVISE="--budget_s=90 --backends=jax,torch"  # torch, where the machine has it
    LIMITS=(75 75 60 70 170)
fi

: > "$LOGDIR/steps.tsv"
step() {  # step NAME LIMIT_S SCRIPT ARGS...: python SCRIPT ARGS under a time limit
    local name=$1 limit=$2 start
    shift 2
    start=$(date +%s)
    echo "== $name (at most ${limit} s): python $*"
    timeout "$limit" "$PYTHON" "$@" >"$LOGDIR/$name.log" 2>&1
    local code=$?
    printf '%s\t%s\t%s\n' "$name" "$code" "$(( $(date +%s) - start ))" >> "$LOGDIR/steps.tsv"
}

# The batch sweep runs the drop-in recipes/batch.py: main.py's batch recipe feeds its
# sweep through tf.data, which a JAX-only machine lacks (benchmarks/gpu_batch.py).
# shellcheck disable=SC2086  # the settings are word lists on purpose
{
step mixed_float16 "${LIMITS[0]}" main.py --recipe=mixed_precision --policy=mixed_float16 \
    --compare $MP --logdir="$LOGDIR/mixed_float16"
step mixed_bfloat16 "${LIMITS[1]}" main.py --recipe=mixed_precision --policy=mixed_bfloat16 \
    --compare $MP --logdir="$LOGDIR/mixed_bfloat16"
step device "${LIMITS[2]}" main.py --recipe=device $DEVICE --logdir="$LOGDIR/device"
step batch "${LIMITS[3]}" benchmarks/gpu_batch.py $BATCH --out="$LOGDIR/batch"
step advise "${LIMITS[4]}" main.py --recipe=advise $ADVISE --logdir="$LOGDIR/advise"
}

echo
echo "KERAS_BACKEND=jax; $("$PYTHON" -c 'import jax; print("jax", jax.__version__, "devices:", ", ".join(str(d) for d in jax.devices()))' 2>&1 | tail -1)"
"$PYTHON" benchmarks/gpu_table.py "$LOGDIR"
echo "whole script $(( $(date +%s) - begin )) s; logs and run folders in $LOGDIR"
