from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
requirements = [line.strip() for line in (here / "requirements.txt").read_text().splitlines()
                if line.strip() and not line.startswith("#")]

CONVERT = ["gguf>=0.16", "safetensors>=0.4", "tqdm>=4.60"]
SERVE = ["aiohttp>=3.9", "pydantic>=2.5", "prometheus_client>=0.17", "llguidance>=1.9"]

setup(
    name="llama",
    version="0.1.0",
    description="Distributed Llama 2 / Llama 3.x inference on torchrun ranks, GPU and CPU",
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["llama", "llama.*"]),
    # our CPU kernels, built on first use (llama/cpu_kernels.py); the chat page served at / (llama/serve/page.py)
    package_data={"llama": ["csrc/*.cpp", "csrc/*.h", "serve/static/*"]},
    python_requires=">=3.10",
    install_requires=requirements,
    extras_require={
        # python -m llama.convert: GGUF files, safetensors folders, a progress bar.
        "convert": CONVERT,
        # python -m llama.serve: the HTTP server (aiohttp), its request schemas (pydantic), its
        # /metrics in Prometheus's format (prometheus_client) and response_format's constrained
        # decoding (llguidance: one wheel, no dependencies).
        "serve": SERVE,
        # llama-models ships Meta's real Llama 3 tokenizer, used by the tests; transformers (with
        # accelerate for its GGUF loading) is the reference the converter is checked against.
        # pexpect drives the interactive chat through a pseudo-terminal; the server is tested with
        # the official openai client (and httpx for requests the client would never send);
        # jsonschema checks the structured outputs; selenium drives chromium, headless, to test the chat
        # page (Debian's chromium and chromium-driver: scripts/install_browser.sh).
        "test": ["pytest>=7", "llama-models==0.3.0", *CONVERT, "transformers>=4.46", "accelerate>=0.26",
                 "pexpect>=4.8", *SERVE, "openai>=1.40", "httpx>=0.23",
                 "jsonschema>=4", "selenium>=4.11"],
    },
)
