"""recsys.index"""
