"""The task registry (`mm_ads.runs.TASKS`): one place maps a task name to what runs it."""

import dataclasses

import pytest

from mm_ads import config as config_lib
from mm_ads import runs


def test_the_registry_names_the_tasks_the_config_accepts():
    assert tuple(runs.TASKS) == config_lib.TASKS
    for name in config_lib.TASKS:
        entry = runs.task(name)
        assert callable(entry.check_inputs) and callable(entry.run) and entry.summary


def test_the_registry_check_refuses_a_task_registered_in_one_place_only():
    runs.check_registry(runs.TASKS, config_lib.TASKS)
    with pytest.raises(RuntimeError, match=r"registers \('ctr', 'scl', 'clip'\), but mm_ads.config.TASKS names "
                                           r"\('ctr', 'scl', 'clip', 'rank'\)"):
        runs.check_registry(runs.TASKS, (*config_lib.TASKS, "rank"))
    with pytest.raises(RuntimeError, match="register a task in both"):
        runs.check_registry({k: v for k, v in runs.TASKS.items() if k != "clip"}, config_lib.TASKS)


def test_an_unknown_task_names_the_known_ones(tmp_path):
    message = r"^unknown task 'rank': the known tasks are ctr, scl, clip$"
    with pytest.raises(ValueError, match=message):
        runs.task("rank")
    # a config that bypassed validation: refused before anything is read or written
    config = dataclasses.replace(config_lib.ExperimentConfig(model_dir=str(tmp_path / "m")), task="rank")
    with pytest.raises(ValueError, match=message):
        runs.run(config)
    with pytest.raises(ValueError, match=message):
        runs.validate_inputs(config)
    assert not (tmp_path / "m").exists()


def test_the_command_line_prints_the_task_summary():
    assert runs.task("ctr").summary[0] == "auc"
    assert runs.task("scl").summary == runs.task("clip").summary == ("acc@1", "acc@5", "acc@10", "num_queries")
