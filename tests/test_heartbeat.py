"""A worker killed before its trial's first heartbeat: the trial is failed and queued again, not left
RUNNING for ever. Optuna's RDB heartbeat skips a running trial that has no heartbeat row yet, so a
study whose worker died in that window would never finish. Real Optuna storages and a real MLflow
store in a temp dir; no model is needed."""

import mlflow
import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from detection import studies, tracking, tune


def _storage(kind, tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}" if kind == "sqlite" else str(tmp_path / "journal.log")
    return studies.open_storage(url, heartbeat=1)


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_a_trial_killed_before_its_first_heartbeat_is_failed_and_retried(store, tmp_path, kind):
    study = optuna.create_study(study_name="s", storage=_storage(kind, tmp_path))
    # What a worker SIGKILLed between creating its trial and its first beat leaves: a RUNNING trial
    # with parameters and neither Optuna's heartbeat nor ours.
    dead = study.ask({"score_thresh": FloatDistribution(0, 1)})
    client = tracking.client()
    parent = client.create_run(client.create_experiment("tune")).info.run_id
    nested = client.create_run(
        client.get_run(parent).info.experiment_id,
        run_name=f"trial {dead.number}",
        tags={"mlflow.parentRunId": parent},
    ).info.run_id
    s = studies.Study(
        req=tune.TuneRequest(model="m", data_dir=tmp_path, study="s", n_trials=1, heartbeat=1),
        study=study,
        parent=parent,
        ref=None,
        config=None,
        model=None,
    )
    started = study.trials[0].datetime_start.timestamp()
    optuna.storages.fail_stale_trials(study)  # Optuna's own heartbeat misses this trial: it never beat
    assert study.trials[0].state == TrialState.RUNNING
    # The clock, not the machine's speed, says how long the trial has gone without a beat.
    assert studies.fail_stale(s, now=lambda: started + s.req.stale_after) == []  # its worker may be alive

    lines = studies.fail_stale(s, now=lambda: started + s.req.stale_after + 0.5)

    assert lines == [
        f"failed trial {dead.number}: no heartbeat for more than 3 s, so its worker died; it is queued to run again"
    ]
    (failed, queued) = study.get_trials(deepcopy=False)
    assert failed.state == TrialState.FAIL
    assert queued.state == TrialState.WAITING and queued.params == failed.params
    assert studies.retried_trial(queued) == dead.number and queued.system_attrs["retry_history"] == [dead.number]
    assert mlflow.get_run(nested).info.status == "KILLED"
    assert studies.fail_stale(s, now=lambda: started + 99) == []  # failed once, reported once
