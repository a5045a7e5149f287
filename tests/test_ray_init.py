"""Starting Ray for a run: the dashboard never kills a run by its absence (issue 10).

On the GPU image Ray's dashboard packages were missing and ``ray.init(include_dashboard=
True)`` raised "Cannot include dashboard with missing packages": the run died. Now
``run.dashboard`` defaults to auto (Ray's own default when the packages are there, off
with one line saying so otherwise); an explicit true insists with a message naming the
field. A real local instance reports where its dashboard and Prometheus endpoint are.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request

import pytest

from sparse_transformer.distributed import trainer
from sparse_transformer.distributed.config import ConfigError, load_config

MISSING = "ModuleNotFoundError: No module named 'aiohttp_cors'"


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, "auto"), (True, "true"), (False, "false"), ("auto", "auto"), ("false", "false")],
)
def test_run_dashboard_is_auto_true_or_false(value: object, expected: str) -> None:
    overrides = [] if value is None else [f"run.dashboard={str(value).lower()}"]
    assert load_config("tiny", overrides).run.dashboard == expected


def test_run_dashboard_rejects_other_values() -> None:
    with pytest.raises(ConfigError, match="run.dashboard: expected one of"):
        load_config("tiny", ["run.dashboard=maybe"])


def test_auto_leaves_the_choice_to_ray_when_the_packages_are_there() -> None:
    assert trainer.dashboard_dependency_error() is None  # the test install has ray[default]
    assert trainer.include_dashboard(load_config("tiny")) is None
    assert trainer.include_dashboard(load_config("tiny", ["run.dashboard=true"])) is True
    assert trainer.include_dashboard(load_config("tiny", ["run.dashboard=false"])) is False


def test_auto_trains_without_the_dashboard_and_says_so_once(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(trainer, "dashboard_dependency_error", lambda: MISSING)
    assert trainer.include_dashboard(load_config("tiny")) is False
    out = capsys.readouterr().out
    assert out.count("Ray dashboard off") == 1 and MISSING in out


def test_true_insists_and_names_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trainer, "dashboard_dependency_error", lambda: MISSING)
    with pytest.raises(ConfigError, match=r"run.dashboard: true, .*aiohttp_cors.*auto"):
        trainer.include_dashboard(load_config("tiny", ["run.dashboard=true"]))
    assert trainer.include_dashboard(load_config("tiny", ["run.dashboard=false"])) is False


@pytest.mark.slow
def test_a_local_instance_reports_its_dashboard_and_metrics_endpoint() -> None:
    import ray

    from tests.test_monitoring import scrape

    instance = trainer.init_ray(load_config("tiny", ["run.num_cpus=1"]))
    try:
        assert instance.started
        assert instance.dashboard_url and instance.dashboard_url.startswith("http://127.0.0.1:")
        try:  # the dashboard answers (Ray's token authentication may refuse the page)
            urllib.request.urlopen(instance.dashboard_url, timeout=10).close()
        except urllib.error.HTTPError as err:
            assert err.code == 401
        assert instance.metrics_url and instance.metrics_url.startswith("http://127.0.0.1:")
        deadline = time.monotonic() + 60  # Ray's exporter serves its series a little later
        while not any(name.startswith("ray_") for name in scrape(instance.metrics_url)):
            assert time.monotonic() < deadline, f"no ray_ series at {instance.metrics_url}"
            time.sleep(1)
        assert trainer.init_ray(load_config("tiny")).started is False  # joins, never twice
    finally:
        ray.shutdown()
