"""Checkpoints round-trip exactly (the server's record of shares too) and refuse altered or foreign files."""
import dataclasses
import json

import pytest
import torch

from pipeline.optim.adam import AdamState
from pipeline.runtime import checkpoint
from pipeline.runtime.server import PushResult, Received, ServerState


def sample():
    params = torch.randn(10)
    state = ServerState(params, AdamState(7, torch.randn(10), torch.rand(10)), version=7, rejected_nonfinite=2)
    return checkpoint.Checkpoint(state, [{"shard": 1, "row": 3}, None], 0.5, {"seed": 0})


def test_roundtrip(tmp_path):
    ck = sample()
    back = checkpoint.load(checkpoint.save(tmp_path / "c", ck))
    assert torch.equal(back.server.params, ck.server.params)
    assert torch.equal(back.server.adam.exp_avg_sq, ck.server.adam.exp_avg_sq)
    assert back.server.adam.step == 7 and back.server.version == 7 and back.server.rejected_nonfinite == 2
    assert back.positions == ck.positions and back.best_val == 0.5 and back.config == {"seed": 0}


def test_tensors_in_a_position_go_to_safetensors_and_come_back(tmp_path):
    """A Truncated learner's carry (shared storage, a 0-d step) beside a plain position; the JSON holds no numbers of it."""
    state = torch.randn(6, 4)
    carry = {"theta": torch.randn(2, 3), "state.0": state, "state.1": state, "step": torch.tensor(40)}
    ck = checkpoint.Checkpoint(sample().server, [{"reader": {"unit": 1, "row": 3}, "carry": carry}, {"reader": None, "carry": None}], None, {})
    path = checkpoint.save(tmp_path / "c", ck)
    written = json.loads((path / checkpoint.STATE).read_text())["positions"][0]
    assert written == {"reader": {"unit": 1, "row": 3}, "carry": {k: {"safetensors": f"positions.0.carry.{k}"} for k in carry}}
    back = checkpoint.load(path)
    assert back.positions[1] == {"reader": None, "carry": None} and back.positions[0]["reader"] == {"unit": 1, "row": 3}
    assert set(back.positions[0]["carry"]) == set(carry)
    for key, value in carry.items():
        assert torch.equal(back.positions[0]["carry"][key], value) and back.positions[0]["carry"][key].dtype == value.dtype


def test_a_checkpoint_written_with_an_extra_key_still_loads(tmp_path):
    path = checkpoint.save(tmp_path / "c", sample())
    state = json.loads((path / checkpoint.STATE).read_text())
    (path / checkpoint.STATE).write_text(json.dumps({**state, "extra": {}}))  # as written before the key was dropped
    back = checkpoint.load(path)
    assert back.server.version == 7 and back.positions == [{"shard": 1, "row": 3}, None]


def test_altered_tensors_are_refused(tmp_path):
    path = checkpoint.save(tmp_path / "c", sample())
    data = bytearray((path / checkpoint.TENSORS).read_bytes())
    data[-3] ^= 0xFF
    (path / checkpoint.TENSORS).write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match="sha256 does not match"):
        checkpoint.load(path)


def test_missing_file_and_wrong_version(tmp_path):
    path = checkpoint.save(tmp_path / "c", sample())
    state = json.loads((path / checkpoint.STATE).read_text())
    state["format_version"] = 99
    (path / checkpoint.STATE).write_text(json.dumps(state))
    with pytest.raises(checkpoint.CheckpointError, match="format_version 99"):
        checkpoint.load(path)
    (path / checkpoint.TENSORS).unlink()
    with pytest.raises(checkpoint.CheckpointError, match="checkpoint file missing"):
        checkpoint.load(path)


def with_record():
    """A sample checkpoint whose server holds worker 1's share 5 and the parameters before its last update."""
    ck = sample()
    result = PushResult(True, "", 7, True, 0)
    server = dataclasses.replace(ck.server, received={1: Received(5, 6, result)}, before=(6, torch.randn(10)))
    return dataclasses.replace(ck, server=server)


def test_the_record_of_shares_round_trips(tmp_path):
    ck = with_record()
    back = checkpoint.load(checkpoint.save(tmp_path / "c", ck)).server
    assert back.received == ck.server.received and back.before[0] == 6 and torch.equal(back.before[1], ck.server.before[1])


def test_a_checkpoint_written_before_the_record_loads_with_none(tmp_path):
    """Written by the previous code: no ``received`` nor ``before_version`` key (nor a ``before.params`` tensor)."""
    path = checkpoint.save(tmp_path / "c", sample())
    state = json.loads((path / checkpoint.STATE).read_text())
    assert state.pop("received") == {} and state.pop("before_version") is None
    (path / checkpoint.STATE).write_text(json.dumps(state))
    back = checkpoint.load(path).server
    assert back.received == {} and back.before is None and back.version == 7


@pytest.mark.parametrize("edit", ["drop-result", "extra-result-field", "before-without-tensor"])
def test_a_malformed_record_of_shares_is_a_checkpoint_error_naming_the_file(tmp_path, edit):
    path = checkpoint.save(tmp_path / "c", with_record() if edit != "before-without-tensor" else sample())
    state = json.loads((path / checkpoint.STATE).read_text())
    if edit == "drop-result":
        del state["received"]["1"]["result"]
    elif edit == "extra-result-field":
        state["received"]["1"]["result"]["colour"] = "red"
    else:
        state["before_version"] = 6
    (path / checkpoint.STATE).write_text(json.dumps(state))
    with pytest.raises(checkpoint.CheckpointError, match=f"{path / checkpoint.STATE}: the server's record of shares is malformed"):
        checkpoint.load(path)
