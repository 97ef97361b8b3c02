"""llama.cpp's real server through the OpenAI backend, default settings, against the embedded backend in the same
run: agreement of expected digits (both simulator modes) and detection margins, and simulator predictions/s.

Needs ``pip install -c constraints.txt -e ".[llamacpp]"``. Last line of stdout: one JSON object.
"""

from __future__ import annotations

import json
import time

from nl_rewrite.llm import llamacpp
from nl_rewrite.llm.embedded import EmbeddedBackend
from nl_rewrite.llm.openai_backend import OpenAIBackend
from nl_rewrite.interp.backend_parity import PROBE_EXPLANATIONS, PROBE_TEXTS, compare_backends
from nl_rewrite.model.loading import EMBEDDED
from nl_rewrite.interp.simulate import SimulationItem, Simulator


def predictions_per_second(backend, items: list[SimulationItem], mode: str) -> float:
    simulator = Simulator(backend, mode)
    start = time.perf_counter()
    n = sum(s.numel() for s in simulator.simulate_many(items))
    return n / (time.perf_counter() - start)


def main() -> None:
    gguf = str(EMBEDDED["smollm2-135m"].locate_gguf())
    embedded = EmbeddedBackend("smollm2-135m")
    tokenize = lambda text: [embedded.tokenizer.decode([i])  # noqa: E731
                             for i in embedded.tokenizer(text, add_special_tokens=False).input_ids]
    items = [SimulationItem(e, tuple(tokenize(PROBE_TEXTS[1]))) for e in PROBE_EXPLANATIONS]
    with llamacpp.llamacpp_server(gguf) as url:
        remote = OpenAIBackend(url, gguf, concurrency=2)
        report = compare_backends(embedded, remote, tokenize)
        speed = {f"{mode}_{name}_pred_per_s": round(predictions_per_second(b, items, mode), 2)
                 for mode in ("all_at_once", "paper") for name, b in (("embedded", embedded), ("llamacpp", remote))}
    for mode in ("all_at_once", "paper"):
        speed[f"{mode}_llamacpp_over_embedded"] = round(speed[f"{mode}_llamacpp_pred_per_s"]
                                                        / speed[f"{mode}_embedded_pred_per_s"], 3)
    print(json.dumps({"benchmark": "llamacpp_parity", "score_mode": remote.score_mode, "agreement": report,
                      **speed, "server_report": vars(remote.report)}))


if __name__ == "__main__":
    main()
