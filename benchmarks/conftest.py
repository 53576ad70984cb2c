"""`pytest benchmarks --benchmark` times every op at realistic shapes against its baselines and writes
benchmarks/results/<op>-<device>.json. Without --benchmark the same code runs once per case at tiny
shapes (a smoke check) and nothing is written."""
import os
from collections import defaultdict

import pytest
import torch

from benchmarks import harness

RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results")


def pytest_addoption(parser):
    parser.addoption("--benchmark", action="store_true", default=False,
                     help="run the benchmarks at realistic shapes and write JSON under benchmarks/results/")


def pytest_configure(config):
    config.fastkd_records = defaultdict(list)
    if not config.getoption("--benchmark"):
        config.option.benchmark_disable = True  # pytest-benchmark then calls each function once


def full_run(config) -> bool:
    return config.getoption("--benchmark")


@pytest.fixture(scope="session")
def bench_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def record(request, bench_device):
    """record(op, **fields): keep one result row for benchmarks/results/<op>-<device>.json."""
    def add(op, **fields):
        request.config.fastkd_records[op].append(fields)
    return add


def pytest_sessionfinish(session):
    config = session.config
    if not full_run(config) or not config.fastkd_records:
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = harness.environment(device)
    for op, rows in config.fastkd_records.items():
        path = os.path.join(RESULTS_DIR, f"{op}-{harness.slug(env['device'])}.json")
        harness.write_results(path, env, rows)
        print(f"\nfastkd: wrote {len(rows)} results to {path}")
