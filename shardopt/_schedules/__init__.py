"""Schedules: functions of the step count whose numbers are array leaves."""
