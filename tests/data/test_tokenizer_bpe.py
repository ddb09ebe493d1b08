"""The BPE tokenizer trained on the world's corpus."""
from vlm.config import WorldConfig
from vlm.data.tokenizer import BOS, EOS, PAD, train_bpe_tokenizer
from vlm.data.prompts import IMAGE_TOKEN
from vlm.world.generator import world_corpus


def test_bpe_on_world_corpus_round_trips_and_keeps_specials():
    texts = list(world_corpus(WorldConfig(n_train=30, n_eval=0), range(30)))
    tok = train_bpe_tokenizer(texts, vocab_size=600, add_bos=True, add_eos=True, extra_special_tokens=(IMAGE_TOKEN,))
    assert tok.convert_tokens_to_ids(PAD) == 0 and tok.pad_token_id == 0
    for text in texts[:50]:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.convert_tokens_to_ids(BOS) and ids[-1] == tok.convert_tokens_to_ids(EOS)
        assert tok.decode(ids, skip_special_tokens=True) == text
    ids = tok(f"{IMAGE_TOKEN}\nDescribe the image.")["input_ids"]
    assert ids.count(tok.convert_tokens_to_ids(IMAGE_TOKEN)) == 1  # one id, never split
    # the world's words compress well: a short caption is far fewer tokens than characters
    assert len(tok("A red circle and two blue stars.")["input_ids"]) < 15
