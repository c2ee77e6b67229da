"""recsys.encoders"""
