"""Stage II's instruction data (data/instructions/stage2.parquet), as `mine` and `build_instructions`
write it for a small synthetic world: FOCI's exact multiple-choice format, the answer letter, an even
spread of the correct letter over A-D, options that are the CLIP-hardest wrong classes whatever
`negatives` says, and the open/closed counts of `instructions.stage2`."""

import numpy as np
import pandas as pd
import pytest
from conftest import make_world_workdir, run_stage, set_params
from scipy.stats import chisquare

from finedefics.artefacts import DESCRIPTIONS, NEGATIVES, STAGE2
from finedefics.data.prepared import load_prepared
from finedefics.mining import Embeddings
from finedefics.protocol import LETTERS, mc_question, open_question, query

NAME = "toy-bird"
CLASSES, TRAIN_PER_CLASS = 12, 30  # 360 train images: 360 closed questions, enough for the chi-square test
N_TRAIN = CLASSES * TRAIN_PER_CLASS


class World:
    """A prepared world with CLIP-like embeddings and a description per train image, in a stage working
    directory; `build` runs the real `mine` and `build_instructions` stages under the given params."""

    def __init__(self, root):
        self.root = make_world_workdir(
            root, NAME, categories=CLASSES, cluster_size=3, train_per_class=TRAIN_PER_CLASS, test_per_class=1
        )
        self.dataset = load_prepared(NAME, self.root / "data" / "prepared")
        rng = np.random.default_rng(0)
        unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
        self.emb = Embeddings(
            list(self.dataset.images.image_id),
            unit(rng.normal(size=(len(self.dataset.images), 16))),
            unit(rng.normal(size=(len(self.dataset.names), 16))),
        )
        (self.root / "data" / "embeddings").mkdir(parents=True)
        self.emb.save(self.root / "data" / "embeddings" / f"{NAME}.npz")
        train = self.dataset.train
        (self.root / "data" / "descriptions").mkdir(parents=True)
        DESCRIPTIONS.write(
            self.root / "data" / "descriptions" / f"{NAME}.parquet",
            pd.DataFrame({"image_id": list(train.image_id), "description": [f"a bird {i}" for i in train.image_id]}),
        )
        self._built: dict[tuple[str, str], tuple[pd.DataFrame, pd.DataFrame, str]] = {}
        self._mined: str | None = None

    def build(self, negatives: str, stage2: str) -> tuple[pd.DataFrame, pd.DataFrame, str]:
        """(negatives parquet, stage2 parquet, build_instructions' stdout) under these params."""
        key = (negatives, stage2)
        if key not in self._built:
            set_params(self.root, negatives=negatives, **{"instructions.stage2": stage2})
            if self._mined != negatives:
                proc = run_stage(self.root, "mine.py", NAME)
                assert proc.returncode == 0, proc.stderr
                self._mined = negatives
            proc = run_stage(self.root, "build_instructions.py")
            assert proc.returncode == 0, proc.stderr
            mined = NEGATIVES.read(self.root / "data" / "negatives" / f"{NAME}.parquet")
            frame = STAGE2.read(self.root / "data" / "instructions" / "stage2.parquet")
            self._built[key] = (mined, frame, proc.stdout)
        return self._built[key]

    def truth(self) -> dict[str, str]:
        """Each train image's category name, from the prepared manifest."""
        train = self.dataset.train
        return dict(zip(train.image_id, train.category))

    def hardest(self) -> dict[str, list[str]]:
        """Each train image's 3 wrong classes of highest CLIP similarity, by brute force over the embeddings."""
        names, truth = self.dataset.names, self.truth()
        out = {}
        for image_id, category in truth.items():
            sims = self.emb.rows([image_id])[0] @ self.emb.classes.T
            wrong = sorted((c for c in range(len(names)) if names[c] != category), key=lambda c: (-sims[c], c))
            out[image_id] = [names[c] for c in wrong[:3]]
        return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return World(tmp_path_factory.mktemp("instructions"))


def closed(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame.kind == "closed"]


def shown_options(question: str) -> list[str]:
    """The option names of a FOCI question, read off its lines "A. name" ... "D. name"."""
    lines = question.split("\n")
    assert len(lines) == 7 and lines[1] == "Choices:", question
    assert [line[:3] for line in lines[2:6]] == ["A. ", "B. ", "C. ", "D. "], question
    return [line[3:] for line in lines[2:6]]


def letter_pvalue(frame: pd.DataFrame) -> tuple[list[int], float]:
    """Counts of the correct letter A-D over the closed questions, and the chi-square p-value of uniformity."""
    answers = closed(frame).answer
    counts = [int((answers == letter).sum()) for letter in LETTERS]
    assert sum(counts) == len(answers)  # every answer is a bare letter
    return counts, float(chisquare(counts).pvalue)


def test_closed_questions_are_foci_multiple_choice_byte_for_byte(world):
    _, frame, _ = world.build("hard", "open+closed")
    questions = closed(frame)
    assert len(questions) == N_TRAIN
    assert world.dataset.plural == "birds"
    for row in questions.itertuples():
        options = shown_options(row.question)
        assert len(set(options)) == 4
        assert row.question == mc_question(query(world.dataset.plural), options)
        assert row.question == (  # FOCI's prompt, spelt out so that a change to protocol.py shows here too
            "Which of these birds is shown in the image?\nChoices:\n"
            f"A. {options[0]}\nB. {options[1]}\nC. {options[2]}\nD. {options[3]}\n"
            "Answer with the letter from the given choices directly."
        )
        assert row.dataset == NAME and row.super_category == "bird"
        assert row.path == f"data/prepared/{NAME}/{row.image_id}"


def test_the_answer_is_the_bare_letter_of_the_ground_truth(world):
    _, frame, _ = world.build("hard", "open+closed")
    truth = world.truth()
    questions = closed(frame)
    assert set(questions.answer) == set(LETTERS)  # "C", never "C. name" or "c"
    for row in questions.itertuples():
        options = shown_options(row.question)
        assert options.count(truth[row.image_id]) == 1
        assert row.answer == LETTERS[options.index(truth[row.image_id])]


def test_the_correct_letter_is_spread_evenly_and_a_biased_allocation_is_caught(world):
    _, frame, _ = world.build("hard", "open+closed")
    counts, p = letter_pvalue(frame)
    assert sum(counts) == N_TRAIN
    assert p > 0.01, counts

    # the same questions with the ground truth always moved to A (e.g. options left unshuffled in CLIP order)
    truth = world.truth()
    biased = frame.copy()
    is_closed = biased.kind == "closed"
    moved = []
    for row in biased[is_closed].itertuples():
        options = shown_options(row.question)
        gt = truth[row.image_id]
        moved.append(mc_question(query(world.dataset.plural), [gt, *(o for o in options if o != gt)]))
    biased.loc[is_closed, "question"] = moved
    biased.loc[is_closed, "answer"] = "A"
    biased_counts, biased_p = letter_pvalue(biased)
    assert biased_counts == [N_TRAIN, 0, 0, 0] and biased_p < 1e-10

    # a milder bias of the same size of dataset is caught too: D never correct, its share spread over A-C
    mild = [n + counts[3] // 3 + (i < counts[3] % 3) for i, n in enumerate(counts[:3])] + [0]
    assert sum(mild) == N_TRAIN and chisquare(mild).pvalue < 0.01


def test_open_mode_asks_only_open_questions_and_open_plus_closed_both(world):
    _, both, both_out = world.build("hard", "open+closed")
    _, only, only_out = world.build("hard", "open")
    truth = world.truth()
    train_ids = sorted(truth)

    assert set(only.kind) == {"open"} and len(only) == N_TRAIN
    assert sorted(only.image_id) == train_ids  # one open question per train image
    assert f"stage II: {N_TRAIN} open-set and 0 multiple-choice questions" in only_out

    assert (
        (both.kind == "open").sum() == N_TRAIN and (both.kind == "closed").sum() == N_TRAIN and len(both) == 2 * N_TRAIN
    )
    assert sorted(both[both.kind == "open"].image_id) == train_ids
    assert sorted(both[both.kind == "closed"].image_id) == train_ids
    assert f"stage II: {N_TRAIN} open-set and {N_TRAIN} multiple-choice questions" in both_out

    for frame in (only, both):
        opened = frame[frame.kind == "open"]
        assert (opened.question == open_question("bird")).all()
        assert open_question("bird") == "What is the name of the bird in the image?"
        assert opened.answer.tolist() == [truth[i] for i in opened.image_id]
    cols = ["image_id", "path", "question", "answer"]
    assert only[cols].reset_index(drop=True).equals(both[both.kind == "open"][cols].reset_index(drop=True))


@pytest.mark.parametrize("negatives", ["hard", "simple", "none"])
def test_options_are_the_clip_hardest_classes_whatever_negatives_says(world, negatives):
    mined, frame, _ = world.build(negatives, "open+closed")
    truth, hardest = world.truth(), world.hardest()
    rows = mined.set_index("image_id")
    questions = closed(frame)
    assert sorted(questions.image_id) == sorted(truth)
    differ = 0
    for row in questions.itertuples():
        options = shown_options(row.question)
        gt, mine_row = truth[row.image_id], rows.loc[row.image_id]
        assert list(mine_row.distractor_categories) == hardest[row.image_id]
        assert sorted(options) == sorted([gt, *hardest[row.image_id]])
        if negatives == "none":
            assert len(mine_row.negative_categories) == 0
        else:
            assert len(mine_row.negative_categories) == 3
        differ += sorted(options) != sorted([gt, *mine_row.negative_categories])
    if negatives == "hard":
        assert differ == 0  # hard negatives are the distractors
    else:  # the negatives are not what the options show: the test tells the two columns apart
        assert differ >= N_TRAIN // 2, differ
    # Stage II does not depend on `negatives`: the same questions, options and letters as with `hard`
    hard = closed(world.build("hard", "open+closed")[1])
    assert (
        questions[["image_id", "question", "answer"]]
        .reset_index(drop=True)
        .equals(hard[["image_id", "question", "answer"]].reset_index(drop=True))
    )
