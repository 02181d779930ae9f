#!/usr/bin/env bash
# Every multi-process test (2 CPU ranks under accelerate launch: DDP/gloo, DeepSpeed, FSDP) run N times in a loop,
# to show the 2-rank exit is not flaky (issue 23). Usage: tests/loop_multiprocess.sh [N=20]; needs the test extras.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_EVALUATE_OFFLINE=1
N=${1:-20}
TESTS=(
  tests/test_accelerate_configs.py::test_cpu_2proc_really_starts_two_gloo_ranks
  tests/test_distributed.py::test_two_cpu_processes_match_one
  tests/test_distributed.py::test_shipped_deepspeed_config_on_cpu_matches_one_process
  tests/test_distributed.py::test_shipped_fsdp_config_on_cpu_matches_one_process
  tests/test_divergences.py::test_two_processes_match_one
  tests/test_embedding_trainer.py::test_two_processes_match_one
  tests/test_faults.py::test_nonfinite_on_one_rank_of_two
  tests/test_faults.py::test_nonfinite_on_a_save_step_under_deepspeed
  tests/test_faults.py::test_deepspeed_applying_a_nonfinite_update_stops_without_saving
  tests/test_intermediate_trainer.py::test_two_processes_match_one
  tests/test_process_group.py::test_no_gloo_thread_outlives_a_two_rank_run
  tests/test_teacher_cache_train.py::test_two_processes_match_one
)
failed_rounds=0
for i in $(seq 1 "$N"); do
  start=$(date +%s)
  if python -m pytest -q -p no:cacheprovider "${TESTS[@]}" > "/tmp/loop_multiprocess_round_$i.log" 2>&1; then
    status=passed
  else
    status=FAILED; failed_rounds=$((failed_rounds + 1))
  fi
  echo "round $i/$N: $status ($(tail -1 "/tmp/loop_multiprocess_round_$i.log")) in $(( $(date +%s) - start )) s"
done
echo "rounds with a failure: $failed_rounds of $N"
[ "$failed_rounds" -eq 0 ]
