import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lessons_lib import evaluate


class FixedClassifier(nn.Module):
    """Predicts class = first feature (rounded), to make accuracy easy to count by hand."""

    def forward(self, x):
        return nn.functional.one_hot(x[:, 0].round().long(), 3).float()


def test_accuracy_by_hand_and_mode_restored():
    X = torch.tensor([[0.0], [1.0], [2.0], [1.0], [0.0]])
    y = torch.tensor([0, 1, 1, 1, 2])
    model = FixedClassifier().train()
    assert evaluate.accuracy(model, X, y, batch_size=2) == pytest.approx(3 / 5)
    assert model.training


def test_correct_marks_each_example_by_hand():
    X = torch.tensor([[0.0], [1.0], [2.0], [1.0], [0.0]])
    y = torch.tensor([0, 1, 1, 1, 2])
    hits = evaluate.correct(FixedClassifier(), X, y, batch_size=2)
    assert hits.dtype == torch.bool and hits.tolist() == [True, True, False, True, False]
    with pytest.raises(ValueError, match="same number"):
        evaluate.correct(FixedClassifier(), X, y[:3])


def test_accuracy_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="equally long"):
        evaluate.accuracy(FixedClassifier(), torch.zeros(3, 1), torch.zeros(2, dtype=torch.long))


class UniformLM(nn.Module):
    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab

    def forward(self, ids):
        return SimpleNamespace(logits=torch.zeros(*ids.shape, self.vocab))  # Hugging Face style output


class CyclicOracle(nn.Module):
    """Knows that token t is always followed by (t + 1) % V."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab

    def forward(self, ids):
        return 50.0 * nn.functional.one_hot((ids + 1) % self.vocab, self.vocab).float()


def test_uniform_model_has_perplexity_equal_to_vocab_size():
    ids = torch.randint(0, 17, (100,))
    assert evaluate.perplexity(UniformLM(17), ids, block_size=10) == pytest.approx(17.0)
    total, count = evaluate.causal_lm_nll(UniformLM(17), ids, block_size=10, batch_size=3)
    assert count == 10 * 9
    assert total == pytest.approx(count * math.log(17))


def test_perfect_model_has_perplexity_one():
    ids = torch.arange(64) % 5
    assert evaluate.perplexity(CyclicOracle(5), ids, block_size=8) == pytest.approx(1.0, abs=1e-6)


def test_perplexity_rejects_bad_input():
    with pytest.raises(ValueError, match="block"):
        evaluate.perplexity(UniformLM(3), torch.zeros(5, dtype=torch.long), block_size=10)
    with pytest.raises(ValueError, match="1-D"):
        evaluate.perplexity(UniformLM(3), torch.zeros(2, 5, dtype=torch.long), block_size=2)


def test_unigram_perplexity_by_hand():
    train = torch.tensor([0, 0, 1])  # counts + 1: [3, 2, 1] over vocab 3 -> p = [1/2, 1/3, 1/6]
    held_out = torch.tensor([0, 2])
    expected = math.exp(-(math.log(1 / 2) + math.log(1 / 6)) / 2)
    assert evaluate.unigram_perplexity(train, held_out, vocab_size=3) == pytest.approx(expected)


def test_embedding_cosine():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[3.0, 0.0], [1.0, 0.0]])
    torch.testing.assert_close(evaluate.embedding_cosine(a, b), torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="shapes differ"):
        evaluate.embedding_cosine(a, b[:1])


def test_mean_pool_ignores_padding():
    hidden = torch.tensor([[[1.0, 1.0], [3.0, 5.0], [100.0, 100.0]]])  # (1, 3, 2)
    mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(evaluate.mean_pool(hidden, mask), torch.tensor([[2.0, 3.0]]))


def test_nearest_neighbour_agreement():
    a = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    assert evaluate.nearest_neighbour_agreement(a, a) == 1.0
    swapped = a[[0, 2, 1, 3]]  # rows 1 and 2 trade places: every neighbour relation changes
    assert evaluate.nearest_neighbour_agreement(a, swapped) == 0.0


class ConfidentlyWrong(nn.Module):
    """Puts all its probability on the wrong token: perplexity overflows a float."""

    def forward(self, ids):
        return -1e4 * nn.functional.one_hot((ids + 1) % 3, 3).float()


def test_perplexity_of_a_broken_model_is_inf_not_an_exception():
    assert evaluate.perplexity(ConfidentlyWrong(), torch.arange(30) % 3, block_size=10) == math.inf


@pytest.mark.parametrize("window,blocks", [(10, 10), (25, 4), (64, 1)])
def test_the_window_sets_how_many_tokens_are_scored(window, blocks):
    """Lesson 03's ``eval_window``: len // window windows, each predicting its tokens 2..window."""
    ids = torch.randint(0, 7, (100,), generator=torch.Generator().manual_seed(window))
    total, count = evaluate.causal_lm_nll(UniformLM(7), ids, block_size=window)
    assert count == blocks * (window - 1)
    assert total == pytest.approx(count * math.log(7))


def test_sentence_embeddings_ignore_padding_and_match_mean_pool_by_hand():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32, max_position_embeddings=16)).eval()
    ids = torch.tensor([[2, 5, 7, 9], [3, 4, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    emb = evaluate.sentence_embeddings(model, [{"input_ids": ids[:1], "attention_mask": mask[:1]},
                                               {"input_ids": ids[1:], "attention_mask": mask[1:]}])
    with torch.no_grad():
        h = model(input_ids=ids, attention_mask=mask).last_hidden_state  # (2, 4, 16)
        alone = model(input_ids=ids[1:, :2]).last_hidden_state  # the short sentence without padding
    torch.testing.assert_close(emb[0], h[0].mean(0))
    torch.testing.assert_close(emb[1], alone[0].mean(0), rtol=1e-5, atol=1e-5)
    assert emb.shape == (2, 16)
