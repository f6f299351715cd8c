"""Omni-Flow core: one time axis for audio, video and speech. Imports no rclpy and no messages."""
