"""ament_python build of omni_ros (colcon calls this; `pip install -e omni_ros` works too)."""

from glob import glob

from setuptools import find_packages, setup

PACKAGE = "omni_ros"

setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(include=[PACKAGE, f"{PACKAGE}.*"]),
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.launch.py")),
        (
            f"share/{PACKAGE}/config",
            glob("config/*.yaml") + glob("config/*.json") + glob("config/*.xml"),
        ),
        (f"share/{PACKAGE}/tensorrt_engines", ["tensorrt_engines/README.md"]),
        # `omni-ros` goes to bin/ so that `source install/setup.sh` puts it on PATH.
        ("bin", ["scripts/omni-ros"]),
    ],
    # 3.10 (Humble) is kept importable and lint-clean; 3.11 (Kilted) and 3.12 (Jazzy) are tested in
    # full by .ci/run. See README "ROS 2 distributions" for the ranges that have 3.10 wheels.
    python_requires=">=3.10",
    install_requires=[
        "numpy>=1.26",
        "scipy>=1.11",
        "soxr>=0.3.7",
        "pillow>=10",
        "webrtcvad-wheels>=2.0.14",
        "rosbags>=0.10",
        "pyyaml>=6",
        "tqdm>=4.66",
        "rich>=13",
        "matplotlib>=3.8",
    ],
    extras_require={
        # The reference stack and the real model. transformers 4.51.0 is what MiniCPM-o 4.5 pins;
        # the fp16 ONNX export tests need onnxruntime >= 1.31.
        "torch": ["torch>=2.4", "transformers>=4.51.0,<6", "onnx>=1.16", "onnxruntime>=1.31"],
        # MiniCPM-o 4.5's remote code and vocoder (requirements/minicpmo.txt says why these, and
        # why minicpmo-utils is installed with --no-deps instead of listed here).
        "minicpmo": [
            "accelerate>=1.0",
            "librosa>=0.10",
            "soundfile>=0.12",
            "hyperpyyaml>=1.2",
            "einops>=0.8",
        ],
        "servers": ["websockets>=12", "httpx>=0.27"],
        # Barge-in detection's default classifier (vad.barge_in_model: silero; webrtc needs none).
        "vad": ["silero-vad>=6", "onnxruntime>=1.18"],
        "audio": ["pyaudio>=0.2.14"],
        "bt": ["py-trees>=2.2"],
        "foxglove": ["foxglove-sdk>=0.30"],
        # Never installable from PyPI alone (see docs/TENSORRT.md): NVIDIA's index provides them.
        "tensorrt": ["tensorrt>=10", "pycuda"],
    },
    zip_safe=True,
    maintainer="omni_ros maintainers",
    maintainer_email="maintainers@omni-ros.org",
    description="Full-duplex omni-modal model (MiniCPM-o 4.5) on ROS 2",
    license="Apache-2.0",
    entry_points={
        "console_scripts": [
            "omni_flow_node = omni_ros.ros.omni_flow_node:main",
            "mic_node = omni_ros.ros.mic_node:main",
            "speaker_node = omni_ros.ros.speaker_node:main",
            "omni_live_view = omni_ros.ros.omni_live_view:main",
            "omni_ros_cli = omni_ros.tools.cli:main",
        ],
    },
)
