"""The old name of `drive_client.pb`, kept so that `from drive_client._pb import drive_pb2` still works."""

import sys

from drive_client.pb import drive_pb2, drive_pb2_grpc

sys.modules[f"{__name__}.drive_pb2"] = drive_pb2
sys.modules[f"{__name__}.drive_pb2_grpc"] = drive_pb2_grpc

__all__ = ["drive_pb2", "drive_pb2_grpc"]
