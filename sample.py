"""
Sample text from a model you trained (or any GPT-2 on the Hugging Face hub).

    python sample.py --model checkpoints/gpt2-124m --prompt "The meaning of life is"
    python sample.py --model checkpoints/gpt2-124m/step_019073.pt --temperature 0 --num_samples 1  # greedy
    echo "Once upon a time" | python sample.py --model hf/gpt2-124m -
    python sample.py --model gpt2 --prompt_file prompt.txt --max_new_tokens 500

--model takes what hellaswag.py does: a checkpoint file, a checkpoint folder (its `latest`), an FSDP
step_NNNNNN.dcp, a Hugging Face folder (export_hf.py writes one) or hub name. Text streams to stdout as it
is generated; the same --seed gives the same text on the same device. Without a prompt each sample begins
a new document (after <|endoftext|>, as training saw them); a sample ends at <|endoftext|> or after
--max_new_tokens. A context longer than the model's block_size slides: the oldest tokens drop out.
"""

import argparse
import codecs
import math
import pickle
import sys

import torch

from checkpoint import load_model
from data import EOT, GPT2_VOCAB, fail, gpt2_tokenizer
from distributed import autocast_for, default_autocast_dtype, default_device


def read_prompt(args):
    """The prompt's text, or None for none (a fresh document)."""
    if args.prompt_file is not None:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as e:
            fail(f"--prompt_file {args.prompt_file}: {e}")
    if args.stdin == "-":
        return sys.stdin.read()
    return args.prompt


def prompt_ids(text, enc, block_size):
    """Token ids to start from: the prompt's (<|endoftext|> in it is the real separator token), or
    <|endoftext|> alone when there is none."""
    if text is None:
        return [EOT]
    if text == "":
        fail("the prompt is empty: give some text, or leave out --prompt to start a new document")
    ids = enc.encode(text, allowed_special={"<|endoftext|>"})
    if len(ids) > block_size:
        fail(f"the prompt is {len(ids)} tokens, longer than the model's context of {block_size}: shorten it")
    return ids


def stream_sample(model, ids, enc, args, generator, device, out):
    """Write one sample's continuation to out as its tokens come; return the new token ids."""
    # a character can span tokens (UTF-8 bytes split by BPE): print each one once it is whole
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    new = []
    with autocast_for(torch.device(device).type, default_autocast_dtype(device) or torch.float32):
        for token in model.generate_tokens(idx, args.max_new_tokens, temperature=args.temperature,
                                           top_k=args.top_k, generator=generator):
            token = token.item()
            if token == EOT:
                break
            new.append(token)
            out.write(utf8.decode(enc.decode_single_token_bytes(token)))
            out.flush()
    out.write(utf8.decode(b"", final=True))
    return new


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a checkpoint file or folder, a Hugging Face folder or name")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--prompt", help="the text to continue (default: none, a new document)")
    source.add_argument("--prompt_file", help="read the prompt from this UTF-8 file")
    source.add_argument("stdin", nargs="?", choices=["-"], help="-: read the prompt from stdin")
    parser.add_argument("--num_samples", type=int, default=4)
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.8, help="0: greedy, always the likeliest token")
    parser.add_argument("--top_k", type=int, default=200, help="sample among the k likeliest tokens; 0: all")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, mps, cpu...")
    args = parser.parse_args(argv)
    if args.num_samples < 1 or args.max_new_tokens < 1 or not 0 <= args.temperature < math.inf or args.top_k < 0:
        fail("--num_samples and --max_new_tokens must be at least 1, --temperature (finite) and --top_k at least 0")
    args.top_k = args.top_k or None

    text = read_prompt(args)
    enc = gpt2_tokenizer()
    device = default_device(args.device)  # never a silent fallback to the CPU
    try:
        model = load_model(args.model, device)
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as e:
        fail(" ".join(str(e).split()))
    model.eval()
    if model.config.vocab_size != GPT2_VOCAB:
        fail(f"--model {args.model} has a vocabulary of {model.config.vocab_size} tokens, not GPT-2's {GPT2_VOCAB}: "
             f"sample.py reads and writes text with GPT-2's tokenizer, so it samples only models trained on it")
    ids = prompt_ids(text, enc, model.config.block_size)
    print(f"{args.model}: {model.num_params() / 1e6:.1f}M parameters on {device}, seed {args.seed}", file=sys.stderr)

    generator = torch.Generator(device=device).manual_seed(args.seed)
    for i in range(args.num_samples):
        if i:
            sys.stdout.write("\n" + "-" * 40 + "\n")
        if text is not None:
            sys.stdout.write(text)
        stream_sample(model, ids, enc, args, generator, device, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
