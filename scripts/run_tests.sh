#!/usr/bin/env bash
# Set up the project with its test extras, lint it, and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh data,test,benchmark
set -euo pipefail
ruff check asl_bundle asl_sim asl_bench scripts studies deploy tests
ruff format --check asl_bundle asl_sim asl_bench scripts studies deploy tests
python -m pytest tests "$@"
