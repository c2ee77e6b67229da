"""recsys.metrics"""
