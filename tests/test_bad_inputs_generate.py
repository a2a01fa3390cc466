"""generate() in both packages: bad prompts and settings are a GenerationError naming the argument,
its value and the fix; non-finite logits are a NonFiniteError instead of a silent token 0."""
import numpy as np
import pytest
import torch

from minivl.errors import GenerationError, NonFiniteError
from minivl.generate import generate as numpy_generate
from minivl.loading import load_model as numpy_load
from minivl.tiny.llm import write_tiny_llm
from torch_impl.generate import generate as torch_generate
from torch_impl.loading import load_model as torch_load


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path = write_tiny_llm(tmp_path_factory.mktemp("gen") / "llama", "llama")
    return {"numpy": (numpy_load(path), numpy_generate), "torch": (torch_load(path), torch_generate)}


BACKENDS = ["numpy", "torch"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("input_ids, fragment", [
    (np.array([[1.0, 2.0]]), "input_ids must be integer token ids (got dtype float64)"),
    (np.array([[1.5, 2.0]], np.float32), "input_ids must be integer token ids (got dtype float32)"),
    (np.array([[True, False]]), "input_ids must be integer token ids (got dtype bool)"),
    ([[1, 2, 3], [4, 5]], "input_ids rows have different lengths (ragged); pad them to one length on the LEFT"),
    (np.zeros((1, 0), np.int64), "input_ids must be [batch, seq] with seq >= 1 (got shape (1, 0))"),
    (np.array([1, 2, 3]), "input_ids must be [batch, seq] with seq >= 1 (got shape (3,)); wrap one prompt as [ids]"),
    (np.array([[1, -4]]), "input_ids hold 1 ids outside the vocabulary [0, "),
    (np.array([[1, 10**6]]), "(e.g. [1000000]); encode the prompt with this model's own tokenizer"),
    ([["a", "b"]], "input_ids must be integer token ids (got dtype <U1)"),
])
def test_bad_prompt_ids(models, backend, input_ids, fragment):
    # issue #16, example 5: float token ids and ragged input_ids were IndexError / ValueError tracebacks
    model, generate = models[backend]
    if backend == "torch" and isinstance(input_ids, np.ndarray) and input_ids.dtype.kind in "fib":
        input_ids = torch.from_numpy(input_ids)
    with pytest.raises(GenerationError) as info:
        generate(model, input_ids=input_ids, max_new_tokens=2)
    assert fragment in str(info.value)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("eos, fragment", [
    ("2", "eos_token_id must be None, a token id (int >= 0) or a list of them (got '2')"),
    ([2, "</s>"], "(got [2, '</s>'])"),
    (-1, "(got -1)"),
    (2.0, "(got 2.0)"),
])
def test_bad_eos_token_id(models, backend, eos, fragment):
    # issue #16, example 5: a string eos_token_id was a ValueError from np.asarray
    model, generate = models[backend]
    with pytest.raises(GenerationError) as info:
        generate(model, input_ids=np.array([[1, 2]]), max_new_tokens=2, eos_token_id=eos)
    assert fragment in str(info.value) and "tokenizer.stop_token_ids" in str(info.value)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", [-1, 2**63, 1.5, "7", True])
def test_bad_seed(models, backend, seed):
    model, generate = models[backend]
    with pytest.raises(GenerationError, match=r"seed must be None or an int in \[0, 2\*\*63 - 1\] \(got .*\); "
                                              r"e\.g\. seed=0"):
        generate(model, input_ids=np.array([[1, 2]]), max_new_tokens=2, do_sample=True, seed=seed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_inputs_embeds(models, backend):
    model, generate = models[backend]
    hidden = model.config.hidden_size
    embeds = np.zeros((1, 0, hidden), np.float32)
    if backend == "torch":
        embeds = torch.from_numpy(embeds)
    with pytest.raises(GenerationError, match=r"inputs_embeds must be \[batch, seq, hidden\] with seq >= 1 "
                                              r"\(got shape \(1, 0, \d+\)\)"):
        generate(model, inputs_embeds=embeds, max_new_tokens=2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_logits_are_a_named_error_not_token_zero(tmp_path, backend):
    # issue #16, example 2: NaN weights gave all-NaN logits and greedy token 0, silently
    from minivl.checkpoint import load_state_dict, save_checkpoint

    path = write_tiny_llm(tmp_path / "nan", "llama")
    tensors = dict(load_state_dict(path))
    tensors["model.norm.weight"] = np.full_like(np.asarray(tensors["model.norm.weight"]), np.nan)
    save_checkpoint(path, None, tensors)
    load, generate = (numpy_load, numpy_generate) if backend == "numpy" else (torch_load, torch_generate)
    model = load(path, allow_nonfinite=True)  # opted out of the checkpoint check: generate still catches it
    with pytest.raises(NonFiniteError) as info:
        generate(model, input_ids=np.array([[1, 2], [3, 4]]), max_new_tokens=3)
    message = str(info.value)
    assert "logits at step 0 are NaN/inf (batch rows [0, 1])" in message
    assert "check the checkpoint (minivl.checkpoint.check_weights)" in message


def test_finite_logits_with_minus_inf_are_fine():
    from minivl.generate import check_finite_logits

    check_finite_logits(np.array([[0.0, -np.inf, 1.0]]), 0)  # a masked token is not an error
    with pytest.raises(NonFiniteError, match=r"batch rows \[1\]"):
        check_finite_logits(np.array([[0.0, 1.0], [-np.inf, -np.inf]]), 4)
