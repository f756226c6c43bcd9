"""What the tests share, in one place: processes, SMTP servers, producers and polling.

Test modules import from here, never from each other. Servers listen on port 0 and report
the port they got; conditions are polled with a deadline that only bounds a failing test.
"""
