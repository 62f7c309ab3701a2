"""Text in and out: special tokens, chat templates, streaming, stop strings and EOS."""

import json
import shutil
import threading
import time
from pathlib import Path

import pytest

from minillm import LLM
from minillm.tokenizer import StopStrings, StreamDecoder, Tokenizer

QWEN3_TOKENIZER = Path(__file__).resolve().parents[1].parent / "shared" / "tokenizers" / "qwen3"


def test_bos_added_by_post_processor_only_when_checkpoint_says(load):
    assert load("llama").tokenizer.encode("hello")[0] == 0
    assert 0 not in load("qwen2", bos=False).tokenizer.encode("hello")


def test_chat_template_that_writes_bos_gets_no_second_bos(checkpoint, tmp_path):
    folder = tmp_path / "llama3-style"
    shutil.copytree(checkpoint("llama"), folder)
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    settings["chat_template"] = (
        "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    )
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    ids = Tokenizer(folder).encode_chat([{"role": "user", "content": "hi"}])
    assert ids[0] == 0 and ids.count(0) == 1


def test_stream_decoder_never_splits_a_multibyte_character(load):
    tok = load("llama").tokenizer
    text = "na\u00efve \u65e5\u672c\u8a9e \U0001f600 caf\u00e9!"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split())  # multi-byte characters really are split over tokens
    decoder = StreamDecoder(tok)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert "" in pieces  # something was held back until its character was complete


def test_stop_strings_spanning_pieces():
    stops = StopStrings(["\nUser:"])
    shown = [stops.feed(p) for p in ["Hello", " there\n", "Us", "er: more", " text"]]
    assert "".join(shown) == "Hello there" and stops.stopped
    assert stops.text == "Hello there"
    partial = StopStrings(["STOP"])
    assert partial.feed("abcST") == "abc"  # "ST" might begin "STOP": held back
    assert partial.feed("x") == "STx"  # it did not
    assert partial.finish() == "" and not partial.stopped


def test_generate_stops_at_a_stop_string_that_spans_tokens(load):
    llm = load("llama")
    free = llm.generate("The quick", max_new_tokens=40, temperature=0)
    detok = StreamDecoder(llm.tokenizer)
    ends, text = [], ""
    for token in free.token_ids:  # where each token's text ends
        text += detok.push(token)
        ends.append(len(text))
    # A stop string that begins inside one token's text and ends inside a later one.
    cut = next(e for e in ends[3:] if 0 < e - 2 and e + 3 <= len(text) and e - 2 not in ends)
    stop = text[cut - 2 : cut + 3]
    stream = llm.stream("The quick", max_new_tokens=40, temperature=0, stop=[stop])
    pieces = list(stream)
    result = stream.completion
    assert result.finish_reason == "stop"
    assert result.text == text[: text.find(stop)]
    assert "".join(pieces) == result.text  # nothing after the stop string reached the user


def test_text_held_back_for_a_possible_stop_string_is_streamed_when_generation_ends(load):
    """The stream holds back a tail that could begin a stop string; if generation ends first, that tail is
    still text the user must get, in the stream as in the completion."""
    llm = load("llama")
    options = dict(max_new_tokens=12, temperature=0, ignore_eos=True)
    text = llm.generate("The quick", **options).text
    stream = llm.stream("The quick", stop=[text[-1] + "\u2603 never generated"], **options)
    pieces = list(stream)
    assert stream.completion.finish_reason == "length" and stream.completion.text == text
    assert "".join(pieces) == text


def test_eos_list_from_generation_config_ends_generation(checkpoint):
    llm = LLM.load(checkpoint("llama", generation={"eos_token_id": [1, 7]}))
    assert llm.defaults.eos_token_ids == [1, 7]
    free = llm.generate("The quick", max_new_tokens=30, temperature=0)
    assert free.finish_reason == "length" or free.token_ids[-1] in (1, 7)
    target = next(t for t in free.token_ids[3:] if t not in (1, 7))
    llm.defaults.eos_token_ids = [1, target]  # as if the checkpoint listed it
    result = llm.generate("The quick", max_new_tokens=30, temperature=0)
    position = free.token_ids.index(target)
    assert result.token_ids == free.token_ids[: position + 1]
    assert result.finish_reason == "stop"
    past = llm.generate("The quick", max_new_tokens=30, temperature=0, ignore_eos=True)  # as benchmarks ask
    llm.defaults.eos_token_ids = []
    assert past.token_ids == llm.generate("The quick", max_new_tokens=30, temperature=0).token_ids
    assert len(past.token_ids) == 30 and past.finish_reason == "length"


def test_generation_config_supplies_sampling_defaults(checkpoint):
    llm = LLM.load(
        checkpoint(
            "qwen2", generation={"do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.8, "max_new_tokens": 5}
        )
    )
    s = llm.defaults.sampling
    assert (s.temperature, s.top_k, s.top_p, llm.defaults.max_new_tokens) == (0.7, 20, 0.8, 5)
    assert len(llm.generate("hello", seed=1).token_ids) <= 5


@pytest.mark.skipif(not QWEN3_TOKENIZER.is_dir(), reason="needs ../shared/tokenizers/qwen3 beside the repo")
@pytest.mark.parametrize("thinking", [None, True, False])
def test_real_qwen3_chat_template_matches_transformers(thinking):
    from transformers import PreTrainedTokenizerFast

    ours = Tokenizer(QWEN3_TOKENIZER)
    theirs = PreTrainedTokenizerFast.from_pretrained(QWEN3_TOKENIZER)
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "2+2? \u65e5\u672c"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ]
    extra = {} if thinking is None else {"enable_thinking": thinking}
    text = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)
    assert ours.apply_chat_template(messages, add_generation_prompt=True, **extra) == text
    ids = theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, **extra)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ours.encode_chat(messages, **extra) == list(ids)
    assert ours.decode(ours.encode("h\u00e9llo \U0001f600")) == "h\u00e9llo \U0001f600"


def test_a_long_text_is_tokenized_while_other_threads_run():
    """A server's event loop and the engine's step go on while a long prompt is tokenized: the tokenizer
    releases the GIL for it (encode_batch), so a ticking thread is never held up for most of the encode."""
    tokenizer = Tokenizer(Path(__file__).resolve().parents[1] / "weights")
    text = "The quick brown fox jumps over the lazy dog 12345. " * 40_000  # 2 MB
    assert tokenizer.encode(text[:5000]) == tokenizer.backend.encode(text[:5000]).ids  # the short path
    gaps, done = [], threading.Event()

    def tick():
        while not done.is_set():
            t = time.perf_counter()
            time.sleep(0.005)
            gaps.append(time.perf_counter() - t)

    ticker = threading.Thread(target=tick)
    ticker.start()
    started = time.perf_counter()
    ids = tokenizer.encode(text)
    took = time.perf_counter() - started
    done.set()
    ticker.join()
    assert ids == tokenizer.backend.encode_batch([text])[0].ids and len(ids) > 500_000
    assert max(gaps) < took / 2, f"a thread waited {max(gaps):.2f} s of a {took:.2f} s encode"
