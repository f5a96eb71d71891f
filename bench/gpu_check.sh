#!/usr/bin/env bash
# The checks only a GPU can show, in one short run (on a lent GPU machine or a cluster's GPU node):
# NCCL process group and a DDP step, training with bf16 autocast and channels_last, prediction on the
# GPU, a two-fold cross-validation whose fold tasks train and predict on the GPU, and training throughput
# (model alone, bf16 vs fp32, real loader vs model alone, per augmentation backend: torch in the loader workers,
# batch on the GPU, DALI when installed) for the reduced DenseNet and DenseNet-121; prediction tiles/s per
# engine and precision. Writes its log and JSON figures to $OUT (default /tmp/gpu-check).
#
#   LYMPHOMA_DATA=/path/to/lymphoma-iicbu2008 bash bench/gpu_check.sh
#
# If the packages are not installed, WHEELS=dir installs the wheels in dir into /tmp/site first.
# SECTIONS picks the checks (default all): ddp tile train predict cv features training-bench predict-bench.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
exec > >(tee "$OUT/log") 2>&1
if [ -n "${WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
RUNS=${RUNS:-/tmp/gpu-check-runs}
SECTIONS=" ${SECTIONS:-ddp tile train predict cv features training-bench predict-bench} "
want() { [[ "$SECTIONS" == *" $1 "* ]]; }
nvidia-smi -L
python3 -c "import torch, tables, submitit, omegaconf; print('torch', torch.__version__, torch.cuda.get_device_name())"
python3 -c "import nvidia.dali" 2>/dev/null && echo "DALI installed" || echo "DALI NOT installed: augment.backend=auto is batch (torch operations on the GPU)"

want ddp && echo "== 1. NCCL process group and a DDP step" && python3 - <<'PY'
import torch, torch.distributed as dist
from lymphoma.model import build_model
from lymphoma.settings import ModelSettings
dist.init_process_group("nccl", rank=0, world_size=1, init_method="tcp://127.0.0.1:29511")
t = torch.ones(4, device="cuda")
dist.all_reduce(t)
model = torch.nn.parallel.DistributedDataParallel(build_model(ModelSettings().architecture(3)).cuda(), device_ids=[0])
with torch.autocast("cuda", dtype=torch.bfloat16):
    loss = model(torch.randn(8, 3, 112, 112, device="cuda")).float().sum()
loss.backward()
print("backend", dist.get_backend(), "all_reduce", t.tolist(), "DDP bf16 step ok, grad norm",
      float(sum(p.grad.norm() for p in model.parameters() if p.grad is not None)))
dist.destroy_process_group()
PY

want tile && echo "== 2. tile" && time python3 -m jobs.cli tile -c configs/lymphoma-lowres.yaml run.root="$RUNS" cluster.parallelism=8 \
  tiles.images_per_shard=8 --no-progress
want train && echo "== 3. train on the GPU (bf16, channels_last)" && time python3 -m jobs.cli train -c configs/lymphoma-lowres.yaml run.root="$RUNS" train.epochs=${EPOCHS:-3} \
  train.num_workers=8 train.batch_size=128
want train && grep -h "epoch\|training on" "$RUNS"/lymphoma-lowres/train/logs/*/*_0_log.out
want predict && echo "== 4. predict on the GPU" && time python3 -m jobs.cli predict --checkpoint "$RUNS"/lymphoma-lowres/train/checkpoints/best.pt \
  "${LYMPHOMA_DATA}/lowres/**/*.png" --out "$RUNS/predict"
want cv && echo "== 5. cross-validation on the GPU (fold tasks: tile, train, predict in one task each)" && time python3 -m jobs.cli cv -c configs/lymphoma-lowres.yaml run.root="$RUNS" run.name=gpu-cv cv.folds=2 \
  cv.inner_val_fraction=0.3 train.epochs=${EPOCHS:-3} train.batch_size=128 cv.baseline=false predict.heatmaps=false
want cv && grep -h "training on" "$RUNS"/gpu-cv/logs/cv/*/*_log.out
want features && echo "== 6. features: the whole per-slide path against the encoder's bare forward (bf16), reduced DenseNet and ViT-S" && python3 bench/bench_features.py --images ${FEATURE_IMAGES:-60} --vit-images ${FEATURE_IMAGES:-60} --batch 256 --readers ${READERS:-8} \
  --out "$OUT/features-gpu.json" | tail -30
echo "== 7. throughput: training from the real loader (tiles on the GPU, and read by loader processes) against the model alone"
for batch in 128 512; do  # the reduced net is launch-bound at 128 on an H100/H200: the host's per-batch work shows
  want training-bench && python3 bench/bench_training.py --workers 8 --batch $batch --images 200 --repeat ${REPEAT:-1} \
    --steps 20 --backends torch,batch,dali --out "$OUT/training-gpu-reduced-b$batch.json"
done
want training-bench && python3 bench/bench_training.py --workers 8 --batch 128 --images 200 --repeat ${REPEAT:-1} --steps 10 \
  --backends torch,batch,dali --preset densenet121 --out "$OUT/training-gpu-densenet121.json"
want predict-bench && python3 bench/bench_predict.py --device cuda --batch 256 --out "$OUT/predict-gpu.json"
echo "== done"
