//! `db::templates`: create and read, visibility (own + public), patch semantics, deletion.

mod common;

use chrono::{DateTime, Utc};
use common::{at, make_user, new_job};
use emp_control_plane::db::jobs::{self, NewJob, WorkflowSource};
use emp_control_plane::db::templates::{self, NewTemplate, Template, TemplatePatch};
use emp_control_plane::db::{Cursor, DbError};
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

fn workflow() -> Value {
    json!({"6": {"class_type": "CLIPTextEncode", "inputs": {"text": "{{prompt}}"}}})
}

fn new_template(user_id: Uuid, name: &str, is_public: bool) -> NewTemplate {
    NewTemplate {
        user_id,
        name: name.to_owned(),
        description: Some(format!("{name} description")),
        category: Some("image".to_owned()),
        workflow: workflow(),
        is_public,
    }
}

async fn set_created_at(pool: &PgPool, id: Uuid, created_at: DateTime<Utc>) {
    sqlx::query("UPDATE job_templates SET created_at = $2 WHERE id = $1")
        .bind(id)
        .bind(created_at)
        .execute(pool)
        .await
        .unwrap();
}

#[sqlx::test(migrations = "../migrations")]
async fn create_find_and_visibility(pool: PgPool) {
    let owner = make_user(&pool, "owner@example.com").await;
    let stranger = make_user(&pool, "stranger@example.com").await;
    let new = new_template(owner.id, "txt2img", false);
    let template = templates::create(&pool, &new).await.unwrap();
    assert_eq!(template.id.get_version_num(), 7);
    assert_eq!(template.user_id, owner.id);
    assert_eq!(template.name, "txt2img");
    assert_eq!(template.description.as_deref(), Some("txt2img description"));
    assert_eq!(template.category.as_deref(), Some("image"));
    assert_eq!(template.workflow, workflow());
    assert!(!template.is_public);
    assert_eq!(template.updated_at, template.created_at);
    assert_eq!(
        templates::find_by_id(&pool, template.id).await.unwrap(),
        template
    );

    assert!(template.visible_to(owner.id));
    assert!(!template.visible_to(stranger.id), "private: only its owner");
    let public = templates::create(&pool, &new_template(owner.id, "shared", true))
        .await
        .unwrap();
    assert!(public.visible_to(owner.id));
    assert!(public.visible_to(stranger.id));

    let bare = templates::create(
        &pool,
        &NewTemplate {
            description: None,
            category: None,
            ..new_template(owner.id, "bare", false)
        },
    )
    .await
    .unwrap();
    assert_eq!((bare.description, bare.category), (None, None));

    assert!(matches!(
        templates::find_by_id(&pool, Uuid::now_v7()).await,
        Err(DbError::NotFound)
    ));
}

#[sqlx::test(migrations = "../migrations")]
async fn create_refuses_bad_rows(pool: PgPool) {
    let owner = make_user(&pool, "owner@example.com").await;
    let empty_name = templates::create(&pool, &new_template(owner.id, "", false)).await;
    assert!(
        matches!(empty_name, Err(DbError::Query(_))),
        "{empty_name:?}"
    );
    let not_an_object = templates::create(
        &pool,
        &NewTemplate {
            workflow: json!([1]),
            ..new_template(owner.id, "t", false)
        },
    )
    .await;
    assert!(
        matches!(not_an_object, Err(DbError::Query(_))),
        "{not_an_object:?}"
    );
    let no_owner = templates::create(&pool, &new_template(Uuid::now_v7(), "t", false)).await;
    assert!(matches!(no_owner, Err(DbError::Query(_))), "{no_owner:?}");
}

#[sqlx::test(migrations = "../migrations")]
async fn list_visible_pages_own_and_public_newest_first(pool: PgPool) {
    let alice = make_user(&pool, "alice@example.com").await;
    let bob = make_user(&pool, "bob@example.com").await;
    // (owner, public, created_at offset)
    let specs = [
        (alice.id, false, 0),
        (bob.id, true, 10),
        (bob.id, false, 10),
        (alice.id, true, 20),
        (bob.id, false, 30),
        (alice.id, false, 30),
        (bob.id, true, 30),
        (alice.id, false, 40),
    ];
    let mut made: Vec<(DateTime<Utc>, Uuid, Uuid, bool)> = Vec::new();
    for (n, (owner, public, offset)) in specs.into_iter().enumerate() {
        let template = templates::create(&pool, &new_template(owner, &format!("t{n}"), public))
            .await
            .unwrap();
        set_created_at(&pool, template.id, at(offset)).await;
        made.push((at(offset), template.id, owner, public));
    }
    made.sort_by_key(|row| std::cmp::Reverse((row.0, row.1)));

    for (viewer, name) in [(alice.id, "alice"), (bob.id, "bob")] {
        let expected: Vec<Uuid> = made
            .iter()
            .filter(|(_, _, owner, public)| *owner == viewer || *public)
            .map(|(_, id, _, _)| *id)
            .collect();
        for limit in [1, 2, 3, 50] {
            let mut served: Vec<Template> = Vec::new();
            let mut cursor: Option<Cursor> = None;
            loop {
                let page = templates::list_visible(&pool, viewer, limit, cursor)
                    .await
                    .unwrap();
                assert!(page.items.len() <= limit);
                served.extend(page.items);
                match page.next_cursor {
                    Some(next) => cursor = Some(next),
                    None => break,
                }
            }
            assert!(
                served.iter().all(|t| t.visible_to(viewer)),
                "{name} sees another's private template"
            );
            let served: Vec<Uuid> = served.iter().map(|t| t.id).collect();
            assert_eq!(served, expected, "{name}, limit {limit}");
        }
    }
    // A user with nothing of their own sees only the public ones.
    let carol = make_user(&pool, "carol@example.com").await;
    let page = templates::list_visible(&pool, carol.id, 50, None)
        .await
        .unwrap();
    assert_eq!(page.items.len(), 3);
    assert!(page.items.iter().all(|t| t.is_public));
}

#[sqlx::test(migrations = "../migrations")]
async fn update_has_patch_semantics(pool: PgPool) {
    let owner = make_user(&pool, "owner@example.com").await;
    let template = templates::create(&pool, &new_template(owner.id, "orig", false))
        .await
        .unwrap();
    sqlx::query("UPDATE job_templates SET updated_at = $2 WHERE id = $1")
        .bind(template.id)
        .bind(at(0))
        .execute(&pool)
        .await
        .unwrap();

    // Nothing given: nothing changes but updated_at.
    let same = templates::update(&pool, template.id, &TemplatePatch::default())
        .await
        .unwrap();
    assert_eq!(
        Template {
            updated_at: template.updated_at,
            ..same.clone()
        },
        template
    );
    assert!(same.updated_at > at(0));

    // Some fields given: only those change.
    let renamed = templates::update(
        &pool,
        template.id,
        &TemplatePatch {
            name: Some("renamed".to_owned()),
            is_public: Some(true),
            ..TemplatePatch::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(renamed.name, "renamed");
    assert!(renamed.is_public);
    assert_eq!(renamed.description, template.description);
    assert_eq!(renamed.category, template.category);
    assert_eq!(renamed.workflow, template.workflow);
    assert_eq!(
        (renamed.user_id, renamed.created_at),
        (template.user_id, template.created_at)
    );

    // Some(None) clears description and category; Some(Some) replaces; a new graph replaces.
    let graph = json!({"9": {"class_type": "SaveImage", "inputs": {}}});
    let cleared = templates::update(
        &pool,
        template.id,
        &TemplatePatch {
            description: Some(None),
            category: Some(Some("video".to_owned())),
            workflow: Some(graph.clone()),
            is_public: Some(false),
            ..TemplatePatch::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(cleared.description, None);
    assert_eq!(cleared.category.as_deref(), Some("video"));
    assert_eq!(cleared.workflow, graph);
    assert!(!cleared.is_public);
    assert_eq!(cleared.name, "renamed", "kept");

    let cleared = templates::update(
        &pool,
        template.id,
        &TemplatePatch {
            category: Some(None),
            description: Some(Some("new".to_owned())),
            ..TemplatePatch::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(cleared.category, None);
    assert_eq!(cleared.description.as_deref(), Some("new"));
    assert_eq!(
        templates::find_by_id(&pool, template.id).await.unwrap(),
        cleared
    );

    let unknown = templates::update(&pool, Uuid::now_v7(), &TemplatePatch::default()).await;
    assert!(matches!(unknown, Err(DbError::NotFound)), "{unknown:?}");
}

#[sqlx::test(migrations = "../migrations")]
async fn delete_keeps_jobs_made_from_it(pool: PgPool) {
    let owner = make_user(&pool, "owner@example.com").await;
    let template = templates::create(&pool, &new_template(owner.id, "t", true))
        .await
        .unwrap();
    let other = templates::create(&pool, &new_template(owner.id, "other", true))
        .await
        .unwrap();
    let rendered = json!({"6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat"}}});
    let job = jobs::create(
        &pool,
        &NewJob {
            workflow: WorkflowSource::Template {
                template_id: template.id,
                rendered: rendered.clone(),
            },
            parameters: json!({"prompt": "a cat"}),
            ..new_job(owner.id)
        },
    )
    .await
    .unwrap();

    templates::delete(&pool, template.id).await.unwrap();
    assert!(matches!(
        templates::find_by_id(&pool, template.id).await,
        Err(DbError::NotFound)
    ));
    let kept = jobs::find_by_id(&pool, job.id).await.unwrap();
    assert_eq!(kept.template_id, None);
    assert_eq!(kept.rendered_workflow, Some(rendered.clone()));
    assert_eq!(kept.workflow(), &rendered);
    assert_eq!(kept.parameters, json!({"prompt": "a cat"}));
    assert_eq!(
        templates::find_by_id(&pool, other.id).await.unwrap(),
        other,
        "only that one"
    );

    assert!(matches!(
        templates::delete(&pool, template.id).await,
        Err(DbError::NotFound)
    ));
    assert!(matches!(
        templates::delete(&pool, Uuid::now_v7()).await,
        Err(DbError::NotFound)
    ));
}
