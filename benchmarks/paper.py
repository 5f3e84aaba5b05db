"""The paper's figures that the benchmarks print beside their own measurements (0.5B models, A100).

Strings, as the paper states them, so the tables show them unchanged.
"""

# Step time relative to GPT+ (forward, backward and optimizer step).
STEP_TIME_RATIO = {"gptplus": "1", "ngpt": "1.096", "angpt": "1.0275"}
# Steps GPT+ takes to its final validation loss, over the steps each architecture needs to reach it.
STEP_SPEEDUP = {"gptplus": "1", "ngpt": "1.29", "angpt": "1.40"}
