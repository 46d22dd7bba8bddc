#!/usr/bin/env bash
# The paper's experiments on the built-in tasks, most important first, with flowdppo compare.
#
#   benchmarks/paper_experiments.sh OUT_DIR [--quick] [EXPERIMENT ...]
#
# EXPERIMENT names a file of configs/experiments/ without .yaml (default: all, in the order
# below). Each writes OUT_DIR/EXPERIMENT/results.md, results.csv, runs.csv and PNG plots;
# an experiment that is already finished there is reused (--reuse). JOBS (default 2) runs
# in parallel, one thread each. docs/RESULTS.md is written up from these folders.
set -uo pipefail
out=${1:?usage: $0 OUT_DIR [--quick] [EXPERIMENT ...]}
shift
quick=()
if [[ ${1:-} == --quick ]]; then quick=(--quick); shift; fi
experiments=("$@")
if [[ ${#experiments[@]} -eq 0 ]]; then
  # The paper's settings transferred in nats per step and the matched-KL sweeps first; then
  # the earlier experiments at per-element settings (docs/RESULTS.md, section 6).
  experiments=(scaled_digits matched_kl_digits multi_reward_scaled_digits scaled_shapes scaled_motion
               ratio_noise_digits single_reward_digits multi_epoch_digits sensitivity_digits
               forgetting_digits multi_reward_digits single_reward_shapes)
fi
here=$(cd "$(dirname "$0")/.." && pwd)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
status=0
for name in "${experiments[@]}"; do
  start=$(date +%s)
  flowdppo compare "$here/configs/experiments/$name.yaml" "${quick[@]}" --jobs "${JOBS:-2}" \
    --out "$out/$name" --reuse || status=1
  echo "== $name: $(( $(date +%s) - start )) s"
done
exit $status
