//! `db::machines`: registration (upsert), folded heartbeats, status changes, the availability
//! and staleness windows (computed from an explicit `now`), lists and counts.

mod common;

use std::collections::HashMap;

use chrono::{DateTime, TimeDelta, Utc};
use common::{at, base_time, ids, make_machine, registration, set_machine_registered_at};
use emp_control_plane::db::machines::{self, Heartbeat, Registration};
use emp_control_plane::db::{Cursor, DbError};
use emp_shared::status::MachineStatus;
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

async fn updated_at(pool: &PgPool, id: Uuid) -> DateTime<Utc> {
    sqlx::query_scalar("SELECT updated_at FROM machines WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn machine_rows(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM machines")
        .fetch_one(pool)
        .await
        .unwrap()
}

#[sqlx::test(migrations = "../migrations")]
async fn register_inserts_a_new_box(pool: PgPool) {
    let new = registration("salad-1", MachineStatus::Starting, at(0));
    let machine = machines::register(&pool, &new).await.unwrap();
    assert_eq!(machine.id, new.id);
    assert_eq!(machine.external_id, "salad-1");
    assert_eq!(machine.provider, "salad");
    assert_eq!(machine.region.as_deref(), Some("us-east"));
    assert_eq!(machine.capabilities, new.capabilities);
    assert_eq!(machine.status, MachineStatus::Starting);
    assert_eq!(machine.last_heartbeat, Some(at(0)));
    assert_eq!(machine.registered_at, at(0));
    assert_eq!(machine.terminated_at, None);

    assert_eq!(
        machines::find_by_id(&pool, machine.id).await.unwrap(),
        machine
    );
    assert_eq!(
        machines::find_by_external_id(&pool, "salad-1")
            .await
            .unwrap(),
        machine
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn registering_again_keeps_the_id_and_refreshes_the_row(pool: PgPool) {
    let first = make_machine(&pool, "box", MachineStatus::Starting, at(0)).await;
    machines::update_status(&pool, first.id, MachineStatus::Terminated)
        .await
        .unwrap();

    let again = Registration {
        id: Uuid::now_v7(),
        external_id: "box".to_owned(),
        provider: "vastai".to_owned(),
        region: None,
        capabilities: json!({"gpu_count": 2}),
        status: MachineStatus::Available,
        at: at(60),
    };
    let machine = machines::register(&pool, &again).await.unwrap();
    assert_eq!(machine.id, first.id, "an existing box keeps its id");
    assert_eq!(machine.provider, "vastai");
    assert_eq!(machine.region, None);
    assert_eq!(machine.capabilities, json!({"gpu_count": 2}));
    assert_eq!(machine.status, MachineStatus::Available);
    assert_eq!(machine.last_heartbeat, Some(at(60)));
    assert_eq!(
        machine.registered_at,
        at(0),
        "first registration time is kept"
    );
    assert_eq!(
        machine.terminated_at, None,
        "a box that comes back is alive again"
    );
    assert_eq!(machine_rows(&pool).await, 1);
    assert!(matches!(
        machines::find_by_id(&pool, again.id).await,
        Err(DbError::NotFound)
    ));

    // A registration older than the last heartbeat does not move it back.
    let stale = registration("box", MachineStatus::Available, at(30));
    let machine = machines::register(&pool, &stale).await.unwrap();
    assert_eq!(machine.last_heartbeat, Some(at(60)));
}

#[sqlx::test(migrations = "../migrations")]
async fn concurrent_registrations_of_one_box_all_succeed_with_one_row(pool: PgPool) {
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..32 {
        let pool = pool.clone();
        tasks.spawn(async move {
            let mut reg = registration("same-box", MachineStatus::Available, at(n));
            reg.capabilities = json!({"attempt": n});
            machines::register(&pool, &reg).await
        });
    }
    let mut ids = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        let machine = joined.unwrap().expect("every registration succeeds");
        ids.push(machine.id);
    }
    assert_eq!(ids.len(), 32);
    assert!(
        ids.iter().all(|id| *id == ids[0]),
        "they all got the same row: {ids:?}"
    );
    assert_eq!(machine_rows(&pool).await, 1);
    let stored = machines::find_by_external_id(&pool, "same-box")
        .await
        .unwrap();
    assert_eq!(stored.id, ids[0]);
    assert_eq!(
        stored.last_heartbeat,
        Some(at(31)),
        "the latest registration time wins"
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn heartbeat_many_updates_many_boxes_in_one_call(pool: PgPool) {
    let a = make_machine(&pool, "a", MachineStatus::Starting, at(0)).await;
    let b = make_machine(&pool, "b", MachineStatus::Available, at(0)).await;
    let c = make_machine(&pool, "c", MachineStatus::Available, at(0)).await;
    let untouched = make_machine(&pool, "d", MachineStatus::Available, at(0)).await;

    let changed = machines::heartbeat_many(
        &pool,
        &[
            Heartbeat {
                id: a.id,
                at: at(10),
                status: MachineStatus::Available,
            },
            Heartbeat {
                id: b.id,
                at: at(11),
                status: MachineStatus::Busy,
            },
            Heartbeat {
                id: c.id,
                at: at(12),
                status: MachineStatus::Draining,
            },
            Heartbeat {
                id: Uuid::now_v7(),
                at: at(13),
                status: MachineStatus::Available,
            },
        ],
    )
    .await
    .unwrap();
    assert_eq!(changed, 3, "the unknown id changes nothing");

    for (id, beat, status) in [
        (a.id, at(10), MachineStatus::Available),
        (b.id, at(11), MachineStatus::Busy),
        (c.id, at(12), MachineStatus::Draining),
        (untouched.id, at(0), MachineStatus::Available),
    ] {
        let machine = machines::find_by_id(&pool, id).await.unwrap();
        assert_eq!(
            (machine.last_heartbeat, machine.status),
            (Some(beat), status)
        );
    }
    assert_eq!(machines::heartbeat_many(&pool, &[]).await.unwrap(), 0);
}

#[sqlx::test(migrations = "../migrations")]
async fn heartbeat_many_never_moves_back_and_latest_beat_wins(pool: PgPool) {
    let a = make_machine(&pool, "a", MachineStatus::Available, at(0)).await;
    let b = make_machine(&pool, "b", MachineStatus::Busy, at(100)).await;

    machines::heartbeat_many(
        &pool,
        &[
            // a beats three times in the batch, the latest not last in the slice.
            Heartbeat {
                id: a.id,
                at: at(20),
                status: MachineStatus::Busy,
            },
            Heartbeat {
                id: a.id,
                at: at(30),
                status: MachineStatus::Draining,
            },
            Heartbeat {
                id: a.id,
                at: at(10),
                status: MachineStatus::Available,
            },
            // b's beat is older than what is stored: neither time nor status move.
            Heartbeat {
                id: b.id,
                at: at(50),
                status: MachineStatus::Available,
            },
        ],
    )
    .await
    .unwrap();
    let a_now = machines::find_by_id(&pool, a.id).await.unwrap();
    assert_eq!(
        (a_now.last_heartbeat, a_now.status),
        (Some(at(30)), MachineStatus::Draining)
    );
    let b_now = machines::find_by_id(&pool, b.id).await.unwrap();
    assert_eq!(
        (b_now.last_heartbeat, b_now.status),
        (Some(at(100)), MachineStatus::Busy)
    );

    // A later batch with an old beat for a changes nothing either.
    machines::heartbeat_many(
        &pool,
        &[Heartbeat {
            id: a.id,
            at: at(25),
            status: MachineStatus::Available,
        }],
    )
    .await
    .unwrap();
    let a_now = machines::find_by_id(&pool, a.id).await.unwrap();
    assert_eq!(
        (a_now.last_heartbeat, a_now.status),
        (Some(at(30)), MachineStatus::Draining)
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn concurrent_heartbeat_batches_over_the_same_boxes_all_succeed(pool: PgPool) {
    // Several persisters (replicas) fold beats of the same boxes at once: their batches must
    // not deadlock one another, whatever order the beats come in.
    let mut machine_ids = Vec::new();
    for n in 0..64 {
        machine_ids.push(
            make_machine(&pool, &format!("m{n}"), MachineStatus::Available, at(0))
                .await
                .id,
        );
    }
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..4_i64 {
        let pool = pool.clone();
        let mut order = machine_ids.clone();
        if task % 2 == 1 {
            order.reverse();
        }
        tasks.spawn(async move {
            for round in 1..=25_i64 {
                let beats: Vec<Heartbeat> = order
                    .iter()
                    .map(|id| Heartbeat {
                        id: *id,
                        at: at(round * 10 + task),
                        status: MachineStatus::Busy,
                    })
                    .collect();
                machines::heartbeat_many(&pool, &beats).await?;
            }
            Ok::<_, DbError>(())
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined.unwrap().expect("no batch fails");
    }
    for id in machine_ids {
        let machine = machines::find_by_id(&pool, id).await.unwrap();
        assert_eq!(
            machine.last_heartbeat,
            Some(at(25 * 10 + 3)),
            "the latest beat of all wins"
        );
        assert_eq!(machine.status, MachineStatus::Busy);
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn heartbeat_many_leaves_terminated_boxes_alone(pool: PgPool) {
    let gone = make_machine(&pool, "gone", MachineStatus::Available, at(0)).await;
    let terminated = machines::update_status(&pool, gone.id, MachineStatus::Terminated)
        .await
        .unwrap();
    let alive = make_machine(&pool, "alive", MachineStatus::Available, at(0)).await;
    let stamp = updated_at(&pool, gone.id).await;

    let changed = machines::heartbeat_many(
        &pool,
        &[
            Heartbeat {
                id: gone.id,
                at: at(60),
                status: MachineStatus::Available,
            },
            Heartbeat {
                id: alive.id,
                at: at(60),
                status: MachineStatus::Available,
            },
        ],
    )
    .await
    .unwrap();
    assert_eq!(changed, 1);
    assert_eq!(
        machines::find_by_id(&pool, gone.id).await.unwrap(),
        terminated
    );
    assert_eq!(
        updated_at(&pool, gone.id).await,
        stamp,
        "the row was not written"
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn update_status_stamps_terminated_at(pool: PgPool) {
    let machine = make_machine(&pool, "m", MachineStatus::Available, at(0)).await;

    let draining = machines::update_status(&pool, machine.id, MachineStatus::Draining)
        .await
        .unwrap();
    assert_eq!(draining.status, MachineStatus::Draining);
    assert_eq!(draining.terminated_at, None);
    assert_eq!(
        draining.last_heartbeat,
        Some(at(0)),
        "a status change is not a heartbeat"
    );

    let before = common::db_now(&pool).await;
    let terminated = machines::update_status(&pool, machine.id, MachineStatus::Terminated)
        .await
        .unwrap();
    let after = common::db_now(&pool).await;
    assert_eq!(terminated.status, MachineStatus::Terminated);
    let stamp = terminated.terminated_at.expect("terminated_at");
    assert!(before <= stamp && stamp <= after);
    assert_eq!(
        machines::find_by_id(&pool, machine.id).await.unwrap(),
        terminated
    );

    let result = machines::update_status(&pool, Uuid::now_v7(), MachineStatus::Offline).await;
    assert!(matches!(result, Err(DbError::NotFound)), "{result:?}");
    assert!(matches!(
        machines::find_by_id(&pool, Uuid::now_v7()).await,
        Err(DbError::NotFound)
    ));
    assert!(matches!(
        machines::find_by_external_id(&pool, "nope").await,
        Err(DbError::NotFound)
    ));
}

#[sqlx::test(migrations = "../migrations")]
async fn find_available_uses_the_five_minute_window(pool: PgPool) {
    let now = base_time();
    let beat = |seconds_ago: i64| now - TimeDelta::seconds(seconds_ago);
    let just_in = make_machine(&pool, "4m59s", MachineStatus::Available, beat(299)).await;
    let edge = make_machine(&pool, "5m00s", MachineStatus::Available, beat(300)).await;
    make_machine(&pool, "5m01s", MachineStatus::Available, beat(301)).await;
    let fresh = make_machine(&pool, "10s", MachineStatus::Available, beat(10)).await;
    let mid = make_machine(&pool, "2m", MachineStatus::Available, beat(120)).await;
    make_machine(&pool, "busy", MachineStatus::Busy, beat(1)).await;
    make_machine(&pool, "draining", MachineStatus::Draining, beat(1)).await;
    make_machine(&pool, "starting", MachineStatus::Starting, beat(1)).await;
    let ended = make_machine(&pool, "terminated", MachineStatus::Available, beat(1)).await;
    machines::update_status(&pool, ended.id, MachineStatus::Terminated)
        .await
        .unwrap();

    let available = machines::find_available(&pool, now).await.unwrap();
    assert_eq!(
        ids(&available, |m| m.id),
        [fresh.id, mid.id, just_in.id, edge.id],
        "AVAILABLE within 5 minutes, most recent first"
    );

    // Six minutes later nothing is fresh enough; a minute earlier the 5m01s box is too.
    assert!(
        machines::find_available(&pool, now + TimeDelta::minutes(6))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        machines::find_available(&pool, now - TimeDelta::minutes(1))
            .await
            .unwrap()
            .len(),
        5
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn cleanup_stale_uses_the_ten_minute_window(pool: PgPool) {
    let now = base_time();
    let beat = |seconds_ago: i64| now - TimeDelta::seconds(seconds_ago);
    let stale_available = make_machine(&pool, "10m01s", MachineStatus::Available, beat(601)).await;
    let stale_busy = make_machine(&pool, "busy 11m", MachineStatus::Busy, beat(660)).await;
    let stale_draining =
        make_machine(&pool, "draining 20m", MachineStatus::Draining, beat(1200)).await;
    let stale_starting =
        make_machine(&pool, "starting 1h", MachineStatus::Starting, beat(3600)).await;
    let edge = make_machine(&pool, "10m00s", MachineStatus::Available, beat(600)).await;
    let recent = make_machine(&pool, "9m59s", MachineStatus::Busy, beat(599)).await;
    let terminated = make_machine(&pool, "terminated", MachineStatus::Available, beat(3600)).await;
    let terminated = machines::update_status(&pool, terminated.id, MachineStatus::Terminated)
        .await
        .unwrap();
    let offline = make_machine(&pool, "offline", MachineStatus::Available, beat(3600)).await;
    let offline = machines::update_status(&pool, offline.id, MachineStatus::Offline)
        .await
        .unwrap();
    let offline_stamp = updated_at(&pool, offline.id).await;

    assert_eq!(machines::cleanup_stale(&pool, now).await.unwrap(), 4);
    for id in [
        stale_available.id,
        stale_busy.id,
        stale_draining.id,
        stale_starting.id,
    ] {
        assert_eq!(
            machines::find_by_id(&pool, id).await.unwrap().status,
            MachineStatus::Offline
        );
    }
    assert_eq!(
        machines::find_by_id(&pool, edge.id).await.unwrap().status,
        MachineStatus::Available
    );
    assert_eq!(
        machines::find_by_id(&pool, recent.id).await.unwrap().status,
        MachineStatus::Busy
    );
    assert_eq!(
        machines::find_by_id(&pool, terminated.id).await.unwrap(),
        terminated
    );
    assert_eq!(
        machines::find_by_id(&pool, offline.id).await.unwrap(),
        offline
    );
    assert_eq!(
        updated_at(&pool, offline.id).await,
        offline_stamp,
        "already OFFLINE: not written"
    );

    // Nothing more to do at the same instant; a second later the 10m00s box goes too.
    assert_eq!(machines::cleanup_stale(&pool, now).await.unwrap(), 0);
    assert_eq!(
        machines::cleanup_stale(&pool, now + TimeDelta::seconds(1))
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        machines::find_by_id(&pool, edge.id).await.unwrap().status,
        MachineStatus::Offline
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn list_pages_newest_registration_first_with_a_status_filter(pool: PgPool) {
    // (external id, status, registered_at offset): two share a registration time.
    let specs = [
        ("m0", MachineStatus::Available, 0),
        ("m1", MachineStatus::Busy, 10),
        ("m2", MachineStatus::Available, 20),
        ("m3", MachineStatus::Available, 20),
        ("m4", MachineStatus::Offline, 30),
        ("m5", MachineStatus::Available, 40),
    ];
    let mut made = Vec::new();
    for (external_id, status, offset) in specs {
        let machine = make_machine(&pool, external_id, MachineStatus::Available, at(100)).await;
        if status != MachineStatus::Available {
            machines::update_status(&pool, machine.id, status)
                .await
                .unwrap();
        }
        set_machine_registered_at(&pool, machine.id, at(offset)).await;
        made.push((at(offset), machine.id, status));
    }
    made.sort_by_key(|row| std::cmp::Reverse((row.0, row.1)));

    let walk = |status: Option<MachineStatus>, limit: usize| {
        let pool = pool.clone();
        async move {
            let mut served = Vec::new();
            let mut cursor: Option<Cursor> = None;
            loop {
                let page = machines::list(&pool, status, limit, cursor).await.unwrap();
                assert!(page.items.len() <= limit);
                if let Some(status) = status {
                    assert!(page.items.iter().all(|m| m.status == status));
                }
                served.extend(page.items.iter().map(|m| m.id));
                match page.next_cursor {
                    Some(next) => cursor = Some(next),
                    None => break served,
                }
            }
        }
    };
    let all: Vec<Uuid> = made.iter().map(|(_, id, _)| *id).collect();
    let available: Vec<Uuid> = made
        .iter()
        .filter(|(_, _, s)| *s == MachineStatus::Available)
        .map(|(_, id, _)| *id)
        .collect();
    for limit in [1, 2, 4, 6, 50] {
        assert_eq!(walk(None, limit).await, all, "limit {limit}");
        assert_eq!(
            walk(Some(MachineStatus::Available), limit).await,
            available,
            "limit {limit}"
        );
    }
    let first = machines::list(&pool, None, 2, None).await.unwrap();
    assert_eq!(first.items.len(), 2);
    assert!(first.next_cursor.is_some());
    assert!(walk(Some(MachineStatus::Terminated), 2).await.is_empty());
}

#[sqlx::test(migrations = "../migrations")]
async fn counts_by_status_counts_every_box(pool: PgPool) {
    assert!(machines::counts_by_status(&pool).await.unwrap().is_empty());
    for (n, status) in [
        MachineStatus::Available,
        MachineStatus::Available,
        MachineStatus::Busy,
        MachineStatus::Draining,
        MachineStatus::Terminated,
        MachineStatus::Available,
    ]
    .into_iter()
    .enumerate()
    {
        let machine = make_machine(&pool, &format!("m{n}"), MachineStatus::Starting, at(0)).await;
        machines::update_status(&pool, machine.id, status)
            .await
            .unwrap();
    }
    make_machine(&pool, "starting", MachineStatus::Starting, at(0)).await;
    let counts: HashMap<MachineStatus, i64> = machines::counts_by_status(&pool)
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(
        counts,
        HashMap::from([
            (MachineStatus::Available, 3),
            (MachineStatus::Busy, 1),
            (MachineStatus::Draining, 1),
            (MachineStatus::Terminated, 1),
            (MachineStatus::Starting, 1),
        ])
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn set_statuses_changes_many_machines_in_one_statement(pool: PgPool) {
    let busy = make_machine(&pool, "busy", MachineStatus::Available, at(0)).await;
    let gone = make_machine(&pool, "gone", MachineStatus::Available, at(0)).await;
    let untouched = make_machine(&pool, "untouched", MachineStatus::Available, at(0)).await;

    let changed = machines::set_statuses(
        &pool,
        &[
            (busy.id, MachineStatus::Busy),
            (gone.id, MachineStatus::Terminated),
            (Uuid::now_v7(), MachineStatus::Busy), // unknown: skipped
        ],
    )
    .await
    .unwrap();
    assert_eq!(changed, 2);
    let busy = machines::find_by_id(&pool, busy.id).await.unwrap();
    assert_eq!(
        (busy.status, busy.terminated_at, busy.last_heartbeat),
        (MachineStatus::Busy, None, Some(at(0))),
        "a status change is not a heartbeat"
    );
    let gone = machines::find_by_id(&pool, gone.id).await.unwrap();
    assert_eq!(gone.status, MachineStatus::Terminated);
    assert!(gone.terminated_at.is_some());
    assert_eq!(
        machines::find_by_id(&pool, untouched.id)
            .await
            .unwrap()
            .status,
        MachineStatus::Available
    );
    // Back from TERMINATED (an operator's mistake undone): the stamp is cleared, as
    // update_status does.
    machines::set_statuses(&pool, &[(gone.id, MachineStatus::Available)])
        .await
        .unwrap();
    assert_eq!(
        machines::find_by_id(&pool, gone.id)
            .await
            .unwrap()
            .terminated_at,
        None
    );
    assert_eq!(machines::set_statuses(&pool, &[]).await.unwrap(), 0);
}
