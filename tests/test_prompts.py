"""Eval prompts under a token budget (issue 8 item 4): history items are dropped oldest first, the
instruction and the user ID are never cut (collate would cut from the left)."""
import numpy as np
import pytest

from ttds_ray.config import TasksConfig
from ttds_ray.tasks import PromptPieces, build_eval_prompts, collate

ITEM_TOKENS = np.arange(200).reshape(50, 4) + 500          # 4 tokens per item
PIECES = PromptPieces((([1, 2, 3], [4]),))                 # instruction before / after the user ID
USER = np.array([[900, 901]])


def test_long_history_drops_old_items_not_the_instruction():
    hist = list(range(40))
    (p,) = build_eval_prompts([hist], ITEM_TOKENS, USER, PIECES, TasksConfig(), max_history=40, max_length=30)
    assert len(p) <= 30
    assert p[:6] == [1, 2, 3, 900, 901, 4]                       # instruction + user ID intact
    assert p[6:] == ITEM_TOKENS[hist[-6:]].reshape(-1).tolist()  # the 6 most recent items, whole
    batch = collate([{"input_ids": p}], pad_id=0, max_length=30)
    assert batch["input_ids"][0, :3].tolist() == [1, 2, 3]       # nothing left for collate to cut


def test_prompt_that_cannot_hold_one_item_is_refused():
    with pytest.raises(ValueError, match="llm.max_length"):
        build_eval_prompts([[1, 2]], ITEM_TOKENS, USER, PIECES, TasksConfig(), max_history=20, max_length=8)


def test_without_a_budget_the_last_max_history_items_are_kept():
    (p,) = build_eval_prompts([list(range(10))], ITEM_TOKENS, USER, PIECES, TasksConfig(), max_history=3)
    assert p[6:] == ITEM_TOKENS[[7, 8, 9]].reshape(-1).tolist()
