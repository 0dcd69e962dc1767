#!/bin/bash
# finlora's speed on 2 cores of a CPU with bf16 instructions: a lent GPU machine's host CPU
# (an Intel Xeon with AVX512-BF16 and AMX).
#
# Run from the repository root: bash benchmarks/bf16_cpu_check.sh, or with
# ISA=AVX512_CORE_BF16 to keep oneDNN off AMX (a CPU with AVX512-BF16 alone). It needs what
# benchmarks/gpu_check.sh needs ($D, default .devdata: site/, smol/, Sentences_AllAgree.txt) and
# writes its results under $OUT (else /tmp). The model is SmolLM2-135M's architecture with
# random weights: speed does not depend on the weights' values. About 4 minutes.
source "$(dirname "$0")/device_env.sh"
CPU2="taskset -c 0,1"
ON_CPU="--set train.device=cpu --set speed.threads=2"
[ -n "${ISA:-}" ] && export ONEDNN_MAX_CPU_ISA=$ISA
step "matmul rates, 2 cores (oneDNN ISA: ${ISA:-all})"
$CPU2 python3 -c "import torch; torch.set_num_threads(2); from finlora.bench import matmul_rate as r; f, b = r(None), r(torch.bfloat16); print(f'fp32 {f/1e9:.0f} GFLOP/s, bf16 {b/1e9:.0f} GFLOP/s, {b/f:.2f}x')"
step "bench infer, 2 cores"
timeout 170 $CPU2 $F bench infer configs/fpb-smollm2-lora.yaml $FPB $ON_CPU -n 32 --rounds 2 \
    --variant speed.fuse_projections=false --variant speed.cast_norms_once=true \
    --variant speed.attention=sdpa 2>&1 | tail -c 2000 | tee $OUT/bench_infer_cpu2.txt
step "bench train, 2 cores"
timeout 250 $CPU2 $F bench train configs/fpb-smollm2-lora.yaml $FPB $ON_CPU -n 32 --rounds 2 \
    --variant speed.lean_mlp=false 2>&1 | tail -c 2000 | tee $OUT/bench_train_cpu2.txt
step done
