"""First answer tokens of INT4 decoders against the fp32 engine, on held-out clips: the check behind
the AWQ choices in calibration/ (RESULTS.md, "Calibration and quantization").

    python benchmarks/awq_first_tokens.py --engine runs/engine-demo2 --int8-engine runs/engine-demo2-q7 \
        --data runs/val7 --data runs/val1

For each clip, the fp32 engine's prefill gives the reference first token (every first token here
is the argmax of a prefill through the runtime's `blip3v.runtime.decoding.prefill`, on the engine's
own OrtBackend or, for a decoder quantized in memory, on OrtBackend's decoder around it). Each variant quantizes
the fp32 decoder (block 32) on 32 calibration clips (seed 424242) and is fed the video tokens of
the INT8 visual graph of --int8-engine (what a calibrated engine runs) and of the fp32 one:
round-to-nearest, AWQ calibrated on the fp32 visual graph's tokens, and AWQ calibrated on the INT8
graph's tokens (what `blip3v calibrate` does). The clipping search that RESULTS.md mentions was
removed in commit 097bf63; its 2 of 400 (fp32 visual tokens) was measured before that commit with
the same comparison, i.e. this script's "AWQ, fp32-visual calibration" row at 9d0a169.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnx

from blip3v.calibration.calibrate import CALIBRATION_SEED, decoder_feeds
from blip3v.calibration.data import CalibrationSet
from blip3v.calibration.graph import session
from blip3v.benchmarks.ort_decoder import OrtDecoder
from blip3v.calibration.weight_only import quantize_decoder
from blip3v.data.synth import write_dataset
from blip3v.runtime.decoding import prefill
from blip3v.runtime.ort_backend import OrtBackend


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", required=True, help="fp32 engine")
    p.add_argument("--int8-engine", required=True, help="an engine calibrated from it (its visual graph is used)")
    p.add_argument("--data", action="append", required=True, help="held-out `blip3v data synth` folder(s)")
    args = p.parse_args()
    fp32 = OrtBackend.load(args.engine)
    int8 = OrtBackend.load(args.int8_engine)

    def feeds(backend: OrtBackend, folder: str, n: int) -> list[dict[str, np.ndarray]]:
        cs = CalibrationSet.from_folder(folder, backend.num_frames, backend.image_size, backend.image_mean,
                                        backend.image_std, samples=n)
        return decoder_feeds(backend, cs)

    with tempfile.TemporaryDirectory() as tmp:
        calib = str(write_dataset(Path(tmp) / "calib", n=32, seed=CALIBRATION_SEED, progress=False))
        calib_fp32, calib_int8 = feeds(fp32, calib, 32), feeds(int8, calib, 32)
    held_fp32 = [f for d in args.data for f in feeds(fp32, d, 10_000)]
    held_int8 = [f for d in args.data for f in feeds(int8, d, 10_000)]
    decoder = onnx.load(str(fp32.manifest.path("decoder")))

    def first_tokens(backend: OrtBackend, held: list[dict[str, np.ndarray]]) -> np.ndarray:
        """The prompt of each feed (embeddings, mask) prefilled into a new cache -> its greedy first id."""
        out = []
        for f in held:
            embeds, mask = f[fp32.embeds_name], f[fp32.mask_name]  # (1, S, D), (1, S)
            out.append(prefill(backend, backend.new_cache(1, mask.shape[1]), embeds, mask).argmax(-1)[0])
        return np.array(out)

    def quantized(model: onnx.ModelProto) -> OrtBackend:
        return OrtDecoder.of_engine(fp32, session(model))

    ref = first_tokens(fp32, held_fp32)
    print(f"{len(ref)} clips; first tokens that differ from the fp32 engine's:")
    print(f"  INT8 visual + fp32 decoder: {(first_tokens(fp32, held_int8) != ref).sum()}")
    for name, method, calib_feeds in (("round-to-nearest", "rtn", calib_fp32),
                                      ("AWQ, fp32-visual calibration", "awq", calib_fp32),
                                      ("AWQ, INT8-visual calibration", "awq", calib_int8)):
        q, _ = quantize_decoder(decoder, calib_feeds, "int4", method, 32)
        backend = quantized(q)
        print(f"  {name}: INT8 visual {(first_tokens(backend, held_int8) != ref).sum()}, "
              f"fp32 visual {(first_tokens(backend, held_fp32) != ref).sum()}")


if __name__ == "__main__":
    main()
