"""The progress lines of long work (issue 22): an ETA a user can believe, and figures per epoch."""

from detection.progress import Bar


def test_the_eta_comes_from_the_pace_of_the_steps_not_the_set_up(capsys):
    """Before: the ETA divided everything since the bar was made (set-up included) by the steps
    done, and `make demo` opened on "eta 9293s" for a 4-minute run."""
    now = [0.0]
    bar = Bar(total=11, description="train", every=1, clock=lambda: now[0])
    now[0] = 100.0  # loading data, building the model, the first MLflow calls
    bar.advance(loss=2.0)
    for _ in range(2):
        now[0] += 5.0  # then 5 s a step
        bar.advance(loss=1.0)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("train 1/11 elapsed 100s eta ?")
    assert lines[-1].startswith("train 3/11 elapsed 110s eta 40s")  # 8 steps left at 5 s


def test_a_note_is_a_line_of_its_own(capsys):
    with Bar(total=2, description="train", every=10) as bar:
        bar.note("epoch 1/2: val loss 0.500, detection rate 0.800, FDR 0.300 (20 val patches)")
    assert capsys.readouterr().err == "epoch 1/2: val loss 0.500, detection rate 0.800, FDR 0.300 (20 val patches)\n"
