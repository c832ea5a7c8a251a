"""Several status replicas on one PostgreSQL database: one ingests, all serve.

Run N processes `python -m status_svc --store postgresql://USER@HOST/DB
--orchestrator HOST:PORT ...` on the same database; each is a replica. What
each runs (wired in status_svc/app.py when the store is PostgreSQL):

- LeasedIngest (ingest.py): competes for the deployment's one ingest lease
  (lease.py: a row with a fencing epoch) every --poll-interval. The holder
  reads the database's latest revision and cursors after acquiring, then runs
  the writer and one follower per orchestrator, renewing the lease every
  --lease-ttl/3. It steps down at once (followers and writer stopped, memory
  dropped, lease released) when the lease is lost, its commits fail or
  anything else in its term fails, and competes again.
- ChangeTailer (tailer.py): LISTENs for the commit notification and reads
  the committed change log after its feed's latest revision, on every
  notification and every --poll-interval, publishing it to the replica's Feed:
  every replica's WatchJob/WatchJobs (the holder's too) are fed from the
  database, never from a writer's memory. It also refreshes the committed
  cursors for reads that ask not_older_than a position.
- ReplicaHealth (health.py): grpc.health NOT_SERVING and reads marked stale
  (with the reason) while the database cannot be read or this replica's
  commits fail; back to SERVING by itself once they work again.

What it guarantees:

- At most one replica commits under a given epoch, and a replica that lost
  the lease can never commit again: every commit transaction first locks the
  lease row and checks the epoch is its own and unexpired (the fence), and a
  takeover needs the same row lock. So revisions stay global and contiguous
  (only the holder's projector assigns them, from the latest committed one),
  and each orchestrator event is applied once (the cursor is committed with
  the state it produced, and a new holder resumes from it).
- A watch on any replica sees every committed revision once, in order
  (the change log is the truth, a notification only the wake-up; a lost
  notification costs at most one poll interval). A watcher whose replica
  dies resumes on any other with after_revision and misses nothing.
- Failover: a holder killed (kill -9, crash: its database connections close)
  is replaced within about one --poll-interval; a holder that hangs with its
  connections open (SIGSTOP, a stalled host) after --lease-ttl. No watcher is
  told anything that was not committed.
- Database trouble (connection cut, server restarted, a failing statement)
  never stops a replica: it reports NOT_SERVING, marks reads stale, retries
  with backoff and catches up from its feed's latest revision when the
  database answers again; nor does a bug in a term (logged, reported the
  same way). (With SQLite an ingest failure still ends the process: see
  status_svc.app.)

Relies on: one PostgreSQL server (the lease's "holder gone" test reads
pg_stat_activity of that server; put no transaction-pooling proxy between
replicas and the database: the lease and LISTEN need their own sessions).
"""
