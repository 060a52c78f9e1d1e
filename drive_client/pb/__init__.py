"""The generated messages and stubs of `drive.v1` (`protos/drive/v1/drive.proto`); `make proto` writes them.

Public and shared: the client and the daemon both use them, and so can any
program that speaks the wire API (`from drive_client.pb import drive_pb2`).
"""
