"""The published numbers the report sets beside a run: *Is Extending Modality The Right Path Towards
Omni-Modality?* (paper/paper-full-text.txt), Tables 3, 4, 5 and the text of §5.2, §5.3 and §6.2, copied once here.
Nothing in the pipeline reads them; the report prints them, cited, next to what the run measured."""
from __future__ import annotations

# Table 3 (Qwen2-7B rows; the paper's columns). HarmBench is attack success rate: lower is better.
TABLE3_COLUMNS = ["MMLU", "MMLU-Pro", "IFEval", "PR", "ZeroScrolls", "GPQA", "MATH", "HumanEval+ P@1",
                  "HumanEval+ P@5", "HumanEval+ P@10", "MMMLU", "HarmBench ASR↓"]
BASE = "Qwen2-7B-Instruct"  # the base LLM of Tables 3 and 4
TABLE3 = {
    BASE: [66.2, 35.1, 58.2, 100.0, 85.7, 13.6, 60.0, 54.2, 82.8, 93.4, 51.4, 15.9],
    "Qwen2-VL-7B-Instruct": [66.5, 40.0, 48.6, 100.0, 90.5, 10.6, 49.8, 37.6, 75.4, 92.1, 51.4, 11.4],
    "LLaVA-Video-7B-Qwen2": [66.6, 37.7, 48.8, 100.0, 76.2, 8.6, 47.2, 41.8, 80.2, 92.1, 48.9, 36.0],
    "LLaVA-OneVision-Qwen2-7B-SI": [65.4, 37.9, 28.6, 100.0, 76.2, 4.6, 14.6, 0.0, 0.0, 0.0, 48.2, 34.1],
}
# the columns a text set's accuracy can stand for (config paper.text_column): all but the attack success rate
TEXT_COLUMNS = [c for c in TABLE3_COLUMNS if not c.endswith("↓")]
# Table 4: merged LLMs on the same columns.
TABLE4 = {
    BASE: TABLE3[BASE],
    "Average: Qwen2-Text/VL/Video": [68.7, 31.0, 58.0, 100.0, 81.0, 10.1, 55.9, 49.6, 83.2, 94.5, 52.7, 18.2],
    "Average: Qwen2-Text/VL/Video/SI": [68.5, 37.4, 58.2, 100.0, 85.7, 11.1, 56.1, 49.5, 83.3, 94.0, 52.6, 20.4],
    "Average: Qwen2-VL/Video": [68.7, 36.0, 54.8, 100.0, 85.7, 9.6, 52.9, 46.0, 82.2, 93.2, 52.5, 19.4],
    "Average: Qwen2-VL/Video/SI": [68.4, 40.0, 53.6, 100.0, 85.7, 9.6, 53.9, 47.8, 82.9, 94.2, 52.3, 23.7],
    "Weighted (Eq. 4): Qwen2-Text/VL/Video/SI": [68.6, 36.3, 58.1, 100.0, 81.0, 9.1, 57.0, 50.0, 82.2, 93.8, 52.8,
                                                 15.4],
}
# Table 5: the merged LMs inside the multimodal carriers.
TABLE5_COLUMNS = ["MMMU", "Video-MME"]
TABLE5 = {
    "Qwen2-VL-7B-Instruct (expert)": [49.44, 62.84],
    "Qwen2-avg-all (Eq. 1)": [48.78, 56.89],
    "Qwen2-weighted-all (Eq. 4)": [48.11, 61.04],
}
# §5.2: Qwen2-VL-7B-Instruct's MMMU baseline before any head is masked.
HEADS_BASELINE = ("Qwen2-VL-7B-Instruct", "MMMU", 49.44)
# §5.3: "the average parameter shift of Qwen2-VL-7B-Instruct is 10 times larger" than LLaVA-Video's and
# LLaVA-OneVision's. The values are what the authors' released code computes (DESIGN §5), not printed in the paper.
SHIFT_RATIO = 10.0
# Per model: mean Δavg, and mean Eq. 4 weight (1 − α0)·α_i, its share of the 0.5 non-base mass
SHIFT_RELEASED = {"Qwen2-VL-7B-Instruct": (0.0043, 0.394), "LLaVA-Video-7B-Qwen2": (0.00087, 0.056),
                  "LLaVA-OneVision-Qwen2-7B-SI": (0.00073, 0.050)}
