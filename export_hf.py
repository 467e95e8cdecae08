"""
Export a model to a Hugging Face folder that transformers loads with no network and no code of ours:

    python export_hf.py --model checkpoints/RUN --out hf/RUN
    python -c "from transformers import pipeline; print(pipeline('text-generation', model='hf/RUN')('Hello,'))"

--model is anything the evaluation scripts take: a checkpoint file, a checkpoint folder (its `latest` file names
the checkpoint), an FSDP step_NNNNNN.dcp folder, a Hugging Face folder or hub name. The folder gets the model
(GPT-2 as GPT2LMHeadModel; the gpt-oss family, --norm rmsnorm --pos rope --mlp swiglu with or without experts,
windows, sinks and GQA, as GptOssForCausalLM), its generation config (<|endoftext|> ends a sample) and GPT-2's
tokenizer, whose ids are tiktoken's. A model no transformers class computes exactly (--mp, --ngpt, GPT-2 with
only some gpt-oss switches) is refused with the reason: an export never loads with different logits.
Files are written into a temporary folder inside --out and moved in, config.json last; other files stay.
"""

import argparse
import os
import pickle

from checkpoint import load_model
from data import GPT2_VOCAB, fail, write_hf_tokenizer


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="a checkpoint file or folder, an FSDP .dcp folder, a Hugging Face folder or hub name")
    parser.add_argument("--out", required=True, help="the folder to write (made if missing; an export there is replaced)")
    args = parser.parse_args(argv)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        fail(f"--out {args.out} is a file: pass a folder (a new one, or an earlier export to replace)")

    try:
        model = load_model(args.model, "cpu")
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as e:
        fail(" ".join(str(e).split()))  # one line, no traceback
    cfg = model.config
    if cfg.vocab_size != GPT2_VOCAB:
        fail(f"--model {args.model} has a vocabulary of {cfg.vocab_size} tokens, GPT-2's tokenizer {GPT2_VOCAB}: "
             f"export_hf.py writes GPT-2's tokenizer, so it exports only models trained on it")
    try:
        model.save_pretrained(args.out, write_extra=lambda folder: write_hf_tokenizer(folder, cfg.block_size))
    except (OSError, ValueError, RuntimeError) as e:  # a refusal names its reason; a full disk, a read-only --out
        fail(f"--model {args.model}: {' '.join(str(e).split())}")
    kind = "GPT2LMHeadModel" if cfg.is_gpt2 else "GptOssForCausalLM"
    print(f"exported {args.model} ({model.num_params(non_embedding=False):,} parameters) to {args.out} as {kind}, "
          f"with GPT-2's tokenizer")


if __name__ == "__main__":
    main()
