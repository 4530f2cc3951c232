"""Faust and Kafka plumbing: the only code that reaches into Faust's internals.

The stages (streams/ingest.py, interest, decide, join, learn, forget, budget, catalog)
hold logic and return results; streams/pipeline.py does their I/O through this package:

- ``consumer.py``: ``BatchApp``, whose consumer hands whole fetched batches of chosen
  topics to a handler and acks them once their writes are durable; ``read_position``
  and ``Positions`` (where the consumer stands on a partition); the watchdog's
  ``FaustConsumerView``.
- ``tablewriter.py``: bulk reads, writes and scans of raw RocksDB tables and their
  changelogs; ``PartitionLocks``; ``ChangelogBuffer``.
- ``restore.py``: bulk changelog restore and the ``TableManager`` that seals and
  restores; ``seal.py``: the embedded broker's changelog seal.
- ``gauges.py``: lag, table sizes, pacing and the broker probe; ``watchdog.py``: the
  stalled-consumer check; ``topicadmin.py``: topic creation.

Faust internals we depend on
----------------------------
Read against faust-streaming==0.15.3 (pinned in pyproject.toml, with aiokafka==0.14.0);
upgrading either means rereading this list and rerunning the integration and recovery
tests first. Private attributes, each with where it is used and why
(tests/unit/test_runtime_boundary.py checks that no module outside this package
touches one, and that this list names every one used here):

- ``Consumer._drain_messages`` (consumer.py): replaced by the batch fetch loop.
- ``Consumer._wait_next_records`` (consumer.py): the fetch the loop waits on.
- ``Consumer._read_offset`` (consumer.py, gauges.py): the processed position of each
  partition (the batch path stores the next offset, Faust's own path the last one
  read); advanced by the batch loop, read by ``read_position``.
- ``Consumer._buffered_partitions`` (consumer.py): records of a partition no longer
  active are dropped unless Faust still buffers it, as Faust's loop does.
- ``Consumer._to_message`` (consumer.py): records of non-batch topics take Faust's
  per-message path.
- ``Consumer._new_offset`` (consumer.py): overridden so a handled batch's next offset
  is what Faust commits.
- ``Consumer._filter_tps_with_pending_acks`` (consumer.py): overridden so batch
  partitions count as having something to commit.
- ``Consumer._acked`` (consumer.py): Faust's own partitions with pending acks, kept in
  that list.
- ``Consumer._n_acked`` and ``Consumer._commit_every`` (consumer.py): a batch's acks
  count towards ``broker_commit_every`` as single acks do.
- ``Consumer._stopped`` (consumer.py): mode's stop event, of the consumer and of its
  fetcher, ends the fetch loop.
- ``Consumer._new_consumer_thread`` (consumer.py): replaced so the aiokafka consumer is
  built by our thread class.
- ``AIOKafkaConsumerThread._create_worker_consumer`` (consumer.py): overridden to set
  the fetch wait.
- ``AIOKafkaConsumer._fetch_max_wait_ms`` (consumer.py, aiokafka's): Faust hard-codes
  1500 ms; with a batch waiting, a quiet partition would stall it
  (``ADPULSE_FETCH_MAX_WAIT_MS``).
- ``App._new_transport`` (consumer.py): overridden so the app's consumer is
  ``BatchConsumer``.
- ``TableManager._recovery`` (restore.py): set to ``BulkRecovery``.
- ``Consumer._thread`` and ``AIOKafkaConsumerThread._ensure_consumer`` (restore.py,
  gauges.py): the aiokafka consumer, on its own thread, in which the active partitions'
  changelogs are paused once recovery completes (``BulkRecovery.on_recovery_completed``;
  Faust's own pause only stops asking for records, and aiokafka's fetches held unread
  records that stopped every fetch from the broker for 100 ms).
- ``AIOKafkaConsumer._fetcher`` and ``Fetcher._records`` (gauges.py, aiokafka's): the
  fetched records waiting unread, per partition, counted for changelogs by
  ``adpulse_consumer_unread_changelog_partitions`` (which shows that pause holding).
- ``Recovery._build_offsets`` (restore.py): overridden; the bulk read runs after the
  highwaters are built and before Faust reads the offsets to start from.
- ``Table._on_changelog_event`` (restore.py): a table with such a callback is not
  restored in bulk (its records must reach the callback).
- ``Store._db_for_partition`` (tablewriter.py, restore.py): a partition's RocksDB, for
  one WriteBatch per partition per batch, multi-gets and scans.
- ``Store._dbs`` (gauges.py): the open partition databases, for RocksDB's key estimate.
- ``Producer._producer`` (tablewriter.py): the aiokafka producer under Faust's, for
  changelog record batches (``create_batch``/``send_batch``) and ``partitions_for``
  (streams/serve.py, through ``aiokafka_producer``); ``producer_threaded`` must stay
  off.

Public but undocumented, also relied on: ``Consumer.wait_empty`` and ``perform_seek``
(overridden and called in consumer.py), ``app.monitor.stream_inbound_time`` (a batch
keeps Faust's livelock detector quiet), ``Store.set_persisted_offset`` and
``offset_key``, ``Recovery.tp_to_table``, ``active_highwaters`` and
``signal_recovery_start`` (restore.py), ``app.tables.changelog_topics``,
``tables.recovery.completed``, ``app.rebalancing``, ``consumer.flow_active``,
``resume_partitions``, ``seek``, ``highwater(s)`` (consumer.py's views),
``app.consumer_generation_id`` and ``app.assignor.assigned_actives`` (the decision
stage's budget cache and the click join's timer, streams/pipeline.py), and, for
``POST /decide`` (streams/serve.py), ``app.web.web_app`` (the aiohttp application),
``app.router.external_topic_key_store``, ``app.producer.key_partition``,
``app.conf.canonical_url`` and ``app.http_client``.
"""
