import pytest

from detection.config import SplitConfig
from detection.data import load_dataset
from detection.split import SPLITS, Split, SplitError, make_split, split_by_case, split_by_image
from tests.conftest import SAMPLE, need_shared


def _full_dataset_cases():
    # BreCaHAD's 17 cases hold 162 images; these sizes add up the same way.
    sizes = [13, 12, 11, 11, 10, 10, 10, 9, 9, 9, 9, 9, 8, 8, 8, 8, 8]
    return {f"Case_{c}": [f"Case_{c}-{i:02d}" for i in range(n)] for c, n in enumerate(sizes, 1)}


@pytest.mark.parametrize("seed", range(5))
def test_no_case_in_two_splits(seed):
    cases = _full_dataset_cases()
    parts = split_by_case(cases, SplitConfig(seed=seed))
    owner = {n: c for c, names in cases.items() for n in names}
    seen = {s: {owner[n] for n in parts[s]} for s in SPLITS}
    assert not (seen["train"] & seen["val"]) and not (seen["train"] & seen["test"]) and not (seen["val"] & seen["test"])
    assert sum(len(parts[s]) for s in SPLITS) == 162
    assert 8 <= len(parts["test"]) <= 12 and 8 <= len(parts["val"]) <= 12


def test_case_split_is_deterministic_by_seed():
    cases = _full_dataset_cases()
    assert split_by_case(cases, SplitConfig(seed=3)) == split_by_case(cases, SplitConfig(seed=3))
    assert split_by_case(cases, SplitConfig(seed=3)) != split_by_case(cases, SplitConfig(seed=4))


def test_paper_split_is_138_12_12():
    names = [f"Case_{i % 17}-{i:03d}" for i in range(162)]
    parts = split_by_image(names, SplitConfig(mode="paper", seed=0))
    assert [len(parts[s]) for s in SPLITS] == [138, 12, 12]
    assert sorted(parts["train"] + parts["val"] + parts["test"]) == sorted(names)


def test_the_real_sample_splits_sensibly():
    samples = load_dataset(need_shared(SAMPLE))
    split = make_split(samples, SplitConfig(), {s.name: s.name for s in samples})
    cases = {s: {n.split("-")[0] for n in split.names(s)} for s in SPLITS}
    assert all(len(cases[s]) >= 1 for s in SPLITS)
    assert len(split.train) >= 12  # the small cases are held out, most images still train
    assert Split.from_dict(split.to_dict()) == split and len(split.digest) == 12
    paper = make_split(samples, SplitConfig(mode="paper"), {})
    assert [len(paper.names(s)) for s in SPLITS] == [16, 1, 1]


def test_too_few_cases_is_a_clear_error():
    with pytest.raises(SplitError, match="at least 3 cases.*data.split.mode=paper"):
        split_by_case({"Case_1": ["a", "b"], "Case_2": ["c"]}, SplitConfig())
