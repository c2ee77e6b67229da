"""recsys.evaluation"""
