#![allow(clippy::unwrap_used)]

use domain::{FieldError, WorkflowSpec};
use policy::{PolicyKind, PolicySet};

fn policies(toml: &str) -> PolicySet {
    match PolicySet::parse(toml, "policies.toml") {
        Ok(p) => p,
        Err(e) => panic!("policy file refused: {e}"),
    }
}

fn spec(yaml: &str) -> WorkflowSpec {
    WorkflowSpec::parse(yaml).unwrap()
}

/// Every violation, as displayed.
fn check(p: &PolicySet, s: &WorkflowSpec) -> Vec<String> {
    let verdicts = p.check(s);
    assert_eq!(verdicts.passed(), verdicts.violations().is_empty());
    verdicts
        .violations()
        .iter()
        .map(ToString::to_string)
        .collect()
}

/// Every problem of a refused policy file, as displayed.
fn refused(toml: &str) -> Vec<String> {
    PolicySet::parse(toml, "policies.toml")
        .unwrap_err()
        .problems
        .iter()
        .map(ToString::to_string)
        .collect()
}

const ERASE: &str = r#"
name: SatelliteDiskErase
labels: {site: aap, team: infra}
blocks:
  - desc: preconditions
    jobs:
      - {action: token_bucket, args: {bucket: disk-erase-satellite}}
      - {action: shell, args: {argv: [./check-decom.sh, --site, x, aap]}}
  - desc: erase
    concurrency: 5
    jobs:
      - {action: shell, args: {argv: [erase, --machine, aap01, aap]}}
      - {action: shell, args: {argv: [erase, --machine, aap02, aap]}}
"#;

// ---- entries ----

#[test]
fn an_entry_with_no_rules_accepts_the_workflow_as_it_is() {
    let p = policies("[workflows.SatelliteDiskErase]\n");
    let verdicts = p.check(&spec(ERASE));
    assert!(verdicts.passed());
    assert_eq!(verdicts.to_string(), "workflows: passed\n");
}

#[test]
fn the_drill_canary_needs_no_entry_and_nothing_else_passes_under_its_name() {
    let p = policies("[workflows.hello]\n");
    assert!(
        p.check(&domain::drill::canary("d1", Some(("site", "aap"))))
            .passed()
    );
    let mut other = domain::drill::canary("d1", None);
    other.blocks[0].jobs[0].action = "noop".into();
    other.blocks[0].jobs[0].args.clear();
    let refused = check(&p, &other);
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(refused[0].contains("no policy entry for workflow \"steward-drill\""));
}

#[test]
fn a_name_with_no_entry_is_refused() {
    let p = policies("[workflows.hello]\n");
    assert_eq!(
        check(&p, &spec(ERASE)),
        [
            r#"policy workflows: name: no policy entry for workflow "SatelliteDiskErase" in policies.toml; add [workflows.SatelliteDiskErase]"#
        ]
    );
    let dotted = spec("name: infra.erase\nblocks: [{jobs: [{action: noop}]}]\n");
    assert_eq!(
        check(&p, &dotted),
        [
            r#"policy workflows: name: no policy entry for workflow "infra.erase" in policies.toml; add [workflows."infra.erase"]"#
        ]
    );
}

#[test]
fn an_empty_set_refuses_everything() {
    for p in [PolicySet::empty(), policies(""), policies("[workflows]\n")] {
        assert!(p.is_empty());
        assert_eq!(p.len(), 0);
        let v = p.check(&spec(ERASE));
        assert!(!v.passed());
        assert_eq!(v.violations()[0].policy, "workflows");
    }
}

#[test]
fn names_and_counts() {
    let p = policies(
        "[workflows.b]\n[workflows.a]\n[workflows.\"infra.erase\"]\nallowed_actions = [\"noop\"]\n",
    );
    assert_eq!(p.len(), 3);
    assert_eq!(
        p.workflow_names().collect::<Vec<_>>(),
        ["a", "b", "infra.erase"]
    );
    assert_eq!(p.origin(), "policies.toml");
    let ok = spec("name: infra.erase\nblocks: [{jobs: [{action: noop}]}]\n");
    assert!(p.check(&ok).passed());
}

// ---- allowed_actions ----

#[test]
fn allowed_actions() {
    let p = policies(
        "[workflows.SatelliteDiskErase]\nallowed_actions = [\"token_bucket\", \"shell\"]\n",
    );
    assert_eq!(check(&p, &spec(ERASE)), Vec::<String>::new());

    let bad = ERASE.replace(
        "{action: shell, args: {argv: [erase, --machine, aap02, aap]}}",
        "{action: http, args: {url: \"http://x\"}}",
    );
    assert_eq!(
        check(&p, &spec(&bad)),
        [
            r#"policy allowed_actions: blocks[1].jobs[1].action: action "http" is not allowed for this workflow; allowed: "token_bucket", "shell""#
        ]
    );
}

// ---- same_args ----

#[test]
fn same_args_accepts_one_value_across_the_run() {
    let p = policies(
        "[workflows.SatelliteDiskErase]\nsame_args = [{ action = \"shell\", arg = \"argv[3]\" }, { action = \"token_bucket\", arg = \"bucket\" }, { action = \"http\", arg = \"site\" }]\n",
    );
    // No http job at all: nothing to compare, the rule passes.
    assert_eq!(check(&p, &spec(ERASE)), Vec::<String>::new());
    assert_eq!(p.check(&spec(ERASE)).iter().count(), 4);
}

#[test]
fn same_args_refuses_a_second_value_and_a_missing_one() {
    let p = policies(
        "[workflows.SatelliteDiskErase]\nsame_args = [{ action = \"shell\", arg = \"argv[3]\" }]\n",
    );
    let bad = ERASE
        .replace("aap02, aap]", "aap02, bbb]")
        .replace("[erase, --machine, aap01, aap]", "[erase, --machine]");
    assert_eq!(
        check(&p, &spec(&bad)),
        [
            r#"policy same_args[0]: blocks[1].jobs[0].args.argv[3]: missing: every shell job must set argv[3] to one value across the run"#,
            r#"policy same_args[0]: blocks[1].jobs[1].args.argv[3]: "bbb" differs from "aap" (blocks[0].jobs[1])"#,
        ]
    );
}

#[test]
fn same_args_with_a_plain_name_and_a_nested_path() {
    let p = policies(
        r#"
[workflows.w]
[[workflows.w.same_args]]
action = "http"
arg = "site"
[[workflows.w.same_args]]
action = "http"
arg = "target.hosts[0]"
"#,
    );
    let s = spec(
        r#"
name: w
blocks:
  - jobs:
      - {action: http, args: {site: aap, target: {hosts: [h1, h2]}}}
      - {action: http, args: {site: aap, target: {hosts: [h1]}}}
  - jobs:
      - {action: http, args: {site: bbb, target: {hosts: [h2]}}}
"#,
    );
    assert_eq!(
        check(&p, &s),
        [
            r#"policy same_args[0]: blocks[1].jobs[0].args.site: "bbb" differs from "aap" (blocks[0].jobs[0])"#,
            r#"policy same_args[1]: blocks[1].jobs[0].args.target.hosts[0]: "h2" differs from "h1" (blocks[0].jobs[0])"#,
        ]
    );
}

#[test]
fn a_policy_lists_at_most_a_hundred_violations_and_counts_the_rest() {
    let p = policies("[workflows.w]\nsame_args = [{ action = \"noop\", arg = \"n\" }]\n");
    let jobs: Vec<String> = (0..250)
        .map(|i| format!("{{action: noop, args: {{n: {i}}}}}"))
        .collect();
    let s = spec(&format!(
        "name: w\nblocks: [{{jobs: [{}]}}]\n",
        jobs.join(", ")
    ));
    let v = p.check(&s).into_violations();
    assert_eq!(v.len(), policy::MAX_VIOLATIONS_PER_POLICY + 1);
    assert_eq!(
        v[0].to_string(),
        "policy same_args[0]: blocks[0].jobs[1].args.n: 1 differs from 0 (blocks[0].jobs[0])"
    );
    assert_eq!(
        v[100].to_string(),
        "policy same_args[0]: spec: 149 more violations of this policy not listed"
    );
}

// ---- start_or_end ----

const TOKEN_FIRST: &str = r#"[workflows.SatelliteDiskErase]
start_or_end = [{ action = "token_bucket", args = { bucket = "disk-erase-satellite" }, position = "start" }]
"#;

#[test]
fn start_accepts_the_first_job() {
    assert_eq!(
        check(&policies(TOKEN_FIRST), &spec(ERASE)),
        Vec::<String>::new()
    );
}

#[test]
fn start_refuses_a_job_that_does_not_open_the_run() {
    let late = ERASE.replace(
        "      - {action: token_bucket, args: {bucket: disk-erase-satellite}}\n      - {action: shell, args: {argv: [./check-decom.sh, --site, x, aap]}}\n",
        "      - {action: shell, args: {argv: [./check-decom.sh, --site, x, aap]}}\n      - {action: noop}\n      - {action: token_bucket, args: {bucket: disk-erase-satellite}}\n",
    );
    assert_eq!(
        check(&policies(TOKEN_FIRST), &spec(&late)),
        [
            r#"policy start_or_end[0]: blocks[0].jobs[2]: the token_bucket job with bucket = "disk-erase-satellite" must be among the first jobs, but blocks[0].jobs[0] (shell) and 1 more job run before it (allowed before it: none)"#
        ]
    );
    // allow_before lets the listed actions go first.
    let allowing = TOKEN_FIRST.replace(
        "position = \"start\"",
        "position = \"start\", allow_before = [\"shell\", \"noop\"]",
    );
    assert_eq!(
        check(&policies(&allowing), &spec(&late)),
        Vec::<String>::new()
    );
    let only_shell = TOKEN_FIRST.replace(
        "position = \"start\"",
        "position = \"start\", allow_before = [\"shell\"]",
    );
    assert_eq!(
        check(&policies(&only_shell), &spec(&late)),
        [
            r#"policy start_or_end[0]: blocks[0].jobs[2]: the token_bucket job with bucket = "disk-erase-satellite" must be among the first jobs, but blocks[0].jobs[1] (noop) runs before it (allowed before it: shell)"#
        ]
    );
}

#[test]
fn start_refuses_a_run_without_the_job() {
    // A token_bucket job on another bucket does not count.
    let other = ERASE.replace("bucket: disk-erase-satellite", "bucket: other");
    assert_eq!(
        check(&policies(TOKEN_FIRST), &spec(&other)),
        [
            r#"policy start_or_end[0]: blocks: no token_bucket job with bucket = "disk-erase-satellite" in the run; one must be among the first jobs"#
        ]
    );
}

#[test]
fn end_and_start_or_end() {
    let p = policies(
        r#"[workflows.w]
start_or_end = [
  { action = "shell", args = { "argv[0]" = "./report.sh" }, position = "end", allow_after = ["noop", "http"] },
  { action = "http", position = "start_or_end" },
]
"#,
    );
    let good_end = spec(
        r#"
name: w
blocks:
  - jobs: [{action: noop}, {action: shell, args: {argv: [./report.sh]}}]
  - jobs: [{action: http}]
"#,
    );
    assert_eq!(check(&p, &good_end), Vec::<String>::new());
    let good_start = spec(
        r#"
name: w
blocks:
  - jobs: [{action: http}, {action: noop}]
  - jobs: [{action: shell, args: {argv: [./report.sh]}}]
"#,
    );
    assert_eq!(check(&p, &good_start), Vec::<String>::new());
    let bad = spec(
        r#"
name: w
blocks:
  - jobs: [{action: noop}, {action: shell, args: {argv: [./report.sh]}}]
  - jobs: [{action: http}, {action: http}]
  - jobs: [{action: shell, args: {argv: [other]}}]
"#,
    );
    assert_eq!(
        check(&p, &bad),
        [
            r#"policy start_or_end[0]: blocks[0].jobs[1]: the shell job with argv[0] = "./report.sh" must be among the last jobs, but blocks[2].jobs[0] (shell) runs after it (allowed after it: noop, http)"#,
            r#"policy start_or_end[1]: blocks[1].jobs[0]: the http job must be among the first or the last jobs, but blocks[0].jobs[0] (noop) and 1 more job run before the first one (allowed before it: none) and blocks[2].jobs[0] (shell) runs after the last one, blocks[1].jobs[1] (allowed after it: none)"#,
        ]
    );
}

// ---- limits ----

#[test]
fn limits() {
    let p = policies(
        "[workflows.SatelliteDiskErase]\nlimits = { max_blocks = 2, max_jobs = 4, max_jobs_per_block = 2, max_concurrency = 5 }\n",
    );
    assert_eq!(check(&p, &spec(ERASE)), Vec::<String>::new());
    let tight = policies(
        "[workflows.SatelliteDiskErase]\n[workflows.SatelliteDiskErase.limits]\nmax_blocks = 1\nmax_jobs = 3\nmax_jobs_per_block = 1\nmax_concurrency = 4\n",
    );
    assert_eq!(
        check(&tight, &spec(ERASE)),
        [
            "policy limits: blocks: 2 blocks; the limit is 1",
            "policy limits: blocks: 4 jobs in all; the limit is 3",
            "policy limits: blocks[0].jobs: 2 jobs; the limit is 1 per block",
            "policy limits: blocks[1].jobs: 2 jobs; the limit is 1 per block",
            "policy limits: blocks[1].concurrency: is 5; the limit is 4",
        ]
    );
}

// ---- labels ----

#[test]
fn labels() {
    let p = policies(
        "[workflows.SatelliteDiskErase]\nlabels = { site = [\"aap\", \"bbb\"], team = [] }\n",
    );
    assert_eq!(check(&p, &spec(ERASE)), Vec::<String>::new());
    let other_site = ERASE.replace("{site: aap, team: infra}", "{site: ccc, team: x}");
    assert_eq!(
        check(&p, &spec(&other_site)),
        [r#"policy labels: labels.site: "ccc" is not an allowed value; allowed: "aap", "bbb""#]
    );
    let none = ERASE.replace("labels: {site: aap, team: infra}\n", "");
    assert_eq!(
        check(&p, &spec(&none)),
        [
            r#"policy labels: labels.site: required label missing; allowed values: "aap", "bbb""#,
            "policy labels: labels.team: required label missing",
        ]
    );
}

// ---- all together ----

const ALL: &str = r#"
[workflows.hello]

[workflows.SatelliteDiskErase]
allowed_actions = ["token_bucket", "shell"]
same_args = [{ action = "shell", arg = "argv[3]" }]
start_or_end = [{ action = "token_bucket", args = { bucket = "disk-erase-satellite" }, position = "start" }]
limits = { max_blocks = 5, max_jobs = 200, max_jobs_per_block = 100, max_concurrency = 10 }
labels = { site = ["aap", "bbb"], team = [] }
"#;

#[test]
fn a_compliant_spec_passes_every_policy() {
    let p = policies(ALL);
    let verdicts = p.check(&spec(ERASE));
    assert!(verdicts.passed());
    assert!(verdicts.clone().into_result().is_ok());
    let kinds: Vec<_> = verdicts.iter().map(|v| v.policy.kind).collect();
    assert_eq!(
        kinds,
        [
            PolicyKind::Workflows,
            PolicyKind::AllowedActions,
            PolicyKind::SameArgs,
            PolicyKind::StartOrEnd,
            PolicyKind::Limits,
            PolicyKind::Labels,
        ]
    );
    let hello = spec("name: hello\nblocks: [{jobs: [{action: anything}]}]\n");
    assert!(p.check(&hello).passed());
}

#[test]
fn every_violation_of_every_policy_at_once() {
    let p = policies(ALL);
    let bad = spec(
        r#"
name: SatelliteDiskErase
labels: {site: ccc}
blocks:
  - concurrency: 20
    jobs:
      - {action: shell, args: {argv: [erase, --machine, aap01, aap]}}
      - {action: http}
      - {action: token_bucket, args: {bucket: disk-erase-satellite}}
      - {action: shell, args: {argv: [erase, --machine, bbb01, bbb]}}
"#,
    );
    let verdicts = p.check(&bad);
    assert_eq!(
        verdicts.to_string(),
        r#"workflows: passed
allowed_actions: failed, 1 violation
  blocks[0].jobs[1].action: action "http" is not allowed for this workflow; allowed: "token_bucket", "shell"
same_args[0]: failed, 1 violation
  blocks[0].jobs[3].args.argv[3]: "bbb" differs from "aap" (blocks[0].jobs[0])
start_or_end[0]: failed, 1 violation
  blocks[0].jobs[2]: the token_bucket job with bucket = "disk-erase-satellite" must be among the first jobs, but blocks[0].jobs[0] (shell) and 1 more job run before it (allowed before it: none)
limits: failed, 1 violation
  blocks[0].concurrency: is 20; the limit is 10
labels: failed, 2 violations
  labels.site: "ccc" is not an allowed value; allowed: "aap", "bbb"
  labels.team: required label missing
"#
    );
    let err = verdicts.clone().into_result().unwrap_err();
    assert_eq!(err.0.len(), 6);
    assert!(err.to_string().starts_with(
        r#"policy allowed_actions: blocks[0].jobs[1].action: action "http" is not allowed"#
    ));
    let field: FieldError = verdicts.into_violations().remove(3).into();
    assert_eq!(
        field.to_string(),
        "blocks[0].concurrency: policy limits: is 20; the limit is 10"
    );
}

#[test]
fn checking_never_changes_the_spec() {
    let p = policies(ALL);
    for text in [
        ERASE,
        "name: SatelliteDiskErase\nblocks: [{jobs: [{action: x}]}]\n",
    ] {
        let s = spec(text);
        let before = s.clone();
        let _ = p.check(&s);
        assert_eq!(s, before);
    }
}

// ---- the file, refused ----

#[test]
fn unknown_keys_are_refused() {
    assert_eq!(
        refused("[workflow.hello]\n"),
        ["policies.toml: workflow: unknown field `workflow`, expected `workflows` (line 1)"]
    );
    assert_eq!(
        refused("[workflows.hello]\nallowed_action = [\"shell\"]\n"),
        [
            "policies.toml: workflows.hello.allowed_action: unknown field `allowed_action`, expected `allowed_actions`, `same_args`, `start_or_end`, `limits`, `labels`, `secrets` or `run_as` (line 2)"
        ]
    );
    assert_eq!(
        refused("[workflows.w]\nlimits = { max_job = 3 }\n"),
        [
            "policies.toml: workflows.w.limits.max_job: unknown field `max_job`, expected one of `max_blocks`, `max_jobs`, `max_jobs_per_block`, `max_concurrency` (line 2)"
        ]
    );
    assert_eq!(
        refused(
            "[workflows.w]\nsame_args = [{ action = \"shell\", arg = \"b\" }, { action = \"shell\", args = \"b\" }]\n"
        ),
        [
            "policies.toml: workflows.w.same_args[1].args: unknown field `args`, expected `action` or `arg` (line 2)"
        ]
    );
}

#[test]
fn wrong_types_and_missing_fields_are_refused() {
    assert_eq!(
        refused("[workflows.w]\nlimits = { max_jobs = \"ten\" }\n"),
        [
            r#"policies.toml: workflows.w.limits.max_jobs: invalid type: string "ten", expected u32 (line 2)"#
        ]
    );
    assert_eq!(
        refused("[workflows.w]\nlimits = { max_jobs = -1 }\n"),
        [
            "policies.toml: workflows.w.limits.max_jobs: invalid value: integer `-1`, expected u32 (line 2)"
        ]
    );
    assert_eq!(
        refused("[workflows.w]\nallowed_actions = \"shell\"\n"),
        [
            r#"policies.toml: workflows.w.allowed_actions: invalid type: string "shell", expected a sequence (line 2)"#
        ]
    );
    assert_eq!(
        refused("[workflows.w]\nsame_args = { action = \"shell\", arg = \"b\" }\n"),
        [
            r#"policies.toml: workflows.w.same_args: must be an array of tables, e.g. same_args = [{ action = "shell", arg = "site" }]; found table (line 2)"#
        ]
    );
    assert_eq!(
        refused("[workflows.w]\nsame_args = [{ action = \"shell\" }]\n"),
        ["policies.toml: workflows.w.same_args[0]: missing field `arg` (line 2)"]
    );
    assert_eq!(
        refused("[workflows.w]\nlabels = { site = \"aap\" }\n"),
        [
            r#"policies.toml: workflows.w.labels.site: invalid type: string "aap", expected a sequence (line 2)"#
        ]
    );
    assert_eq!(
        refused("workflows = 3\n"),
        [
            "policies.toml: workflows: must be a table with one entry per workflow name, e.g. [workflows.hello] (line 1)"
        ]
    );
    assert_eq!(
        refused("[workflows]\nhello = true\n"),
        [
            "policies.toml: workflows.hello: must be a table of rules; write [workflows.hello] for a workflow accepted as it is (line 2)"
        ]
    );
}

#[test]
fn bad_values_are_refused() {
    assert_eq!(
        refused("[workflows.SatelliteDiskErase]\nlimits = { max_jobs = 0, max_blocks = 1 }\n"),
        [
            "policies.toml: workflows.SatelliteDiskErase.limits.max_jobs: must be at least 1 (line 2)"
        ]
    );
    assert_eq!(
        refused("[workflows.w]\nallowed_actions = [\"shell\", \"\", \" \"]\n"),
        [
            "policies.toml: workflows.w.allowed_actions[1]: must be a non-empty action name (line 2)",
            "policies.toml: workflows.w.allowed_actions[2]: must be a non-empty action name (line 2)",
        ]
    );
    assert_eq!(
        refused(
            "[workflows.w]\nallowed_actions = [\"shell\",\n  \"shel\"]\nsame_args = [{ action = \"ssh\", arg = \"host\" }]\n"
        ),
        [
            "policies.toml: workflows.w.allowed_actions[1]: unknown action \"shel\"; the actions are: shell, http, write_file, sleep, token_bucket, noop (line 3)",
            "policies.toml: workflows.w.same_args[0].action: unknown action \"ssh\"; the actions are: shell, http, write_file, sleep, token_bucket, noop (line 4)",
        ]
    );
    assert_eq!(
        refused("[workflows.w]\nallowed_actions = []\n"),
        [
            "policies.toml: workflows.w.allowed_actions: must list at least one action (to refuse this workflow, remove its entry) (line 2)"
        ]
    );
    assert_eq!(
        refused("[workflows.w]\nsame_args = [{ action = \"\", arg = \"argv[x]\" }]\n"),
        [
            "policies.toml: workflows.w.same_args[0].action: must be a non-empty action name (line 2)",
            r#"policies.toml: workflows.w.same_args[0].arg: "argv[x]" is not a valid arg path: an index must be a number, e.g. [3]; write an arg name, then optionally [index] or .field steps, e.g. site or argv[3] (line 2)"#,
        ]
    );
    assert_eq!(
        refused(
            "[workflows.w]\nstart_or_end = [{ action = \"token_bucket\", args = { \"argv[\" = 1 }, position = \"start\" }]\n"
        ),
        [
            r#"policies.toml: workflows.w.start_or_end[0].args."argv[": "argv[" is not a valid arg path: '[' without a closing ']'; write an arg name, then optionally [index] or .field steps, e.g. site or argv[3] (line 2)"#
        ]
    );
}

#[test]
fn bad_positions_are_refused() {
    assert_eq!(
        refused(
            "[workflows.w]\nstart_or_end = [{ action = \"token_bucket\", position = \"first\" }]\n"
        ),
        [
            "policies.toml: workflows.w.start_or_end[0].position: unknown variant `first`, expected one of `start`, `end`, `start_or_end` (line 2)"
        ]
    );
    assert_eq!(
        refused("[workflows.w]\nstart_or_end = [{ action = \"token_bucket\" }]\n"),
        ["policies.toml: workflows.w.start_or_end[0]: missing field `position` (line 2)"]
    );
    assert_eq!(
        refused(
            "[workflows.w]\nstart_or_end = [{ action = \"token_bucket\", position = \"start\", allow_after = [\"noop\"] }]\n"
        ),
        [
            r#"policies.toml: workflows.w.start_or_end[0].allow_after: applies only when position is "end" or "start_or_end" (here it is start) (line 2)"#
        ]
    );
}

#[test]
fn bad_names_and_label_keys_are_refused() {
    assert_eq!(
        refused("[workflows.9lives]\n[workflows.\"bad name\"]\n"),
        [
            r#"policies.toml: workflows.9lives: "9lives" is not a valid workflow name: start with a letter, then letters, digits, '_', '-' or '.' (line 1)"#,
            r#"policies.toml: workflows."bad name": "bad name" is not a valid workflow name: start with a letter, then letters, digits, '_', '-' or '.' (line 2)"#,
        ]
    );
    assert_eq!(
        refused("[workflows.w]\nlabels = { \"a b\" = [] }\n"),
        [
            r#"policies.toml: workflows.w.labels."a b": key "a b" may hold only letters, digits, '_', '-', '.' and '/' (line 2)"#
        ]
    );
}

#[test]
fn every_problem_in_the_file_at_once_in_document_order() {
    let problems = refused(
        r#"
[workflows.b]
limits = { max_jobs = 0 }
bogus = 1

[workflows.a]
same_args = [{ action = "shell", arg = "" }]
start_or_end = [{ action = "t", position = "middle" }]
"#,
    );
    assert_eq!(
        problems,
        [
            "policies.toml: workflows.b.limits.max_jobs: must be at least 1 (line 3)",
            "policies.toml: workflows.b.bogus: unknown field `bogus`, expected `allowed_actions`, `same_args`, `start_or_end`, `limits`, `labels`, `secrets` or `run_as` (line 4)",
            r#"policies.toml: workflows.a.same_args[0].arg: "" is not a valid arg path: it must start with an arg name; write an arg name, then optionally [index] or .field steps, e.g. site or argv[3] (line 7)"#,
            "policies.toml: workflows.a.start_or_end[0].position: unknown variant `middle`, expected one of `start`, `end`, `start_or_end` (line 8)",
        ]
    );
}

#[test]
fn toml_syntax_errors_are_refused_with_the_line() {
    assert_eq!(
        refused("[workflows.a]\n[workflows.a]\n"),
        ["policies.toml: line 2, column 12: duplicate key"]
    );
    let problems = refused("[workflows.w]\nlimits = { max_jobs = }\n");
    assert_eq!(problems.len(), 1);
    assert!(
        problems[0].starts_with("policies.toml: line 2, column 23: "),
        "{problems:?}"
    );
}

#[test]
fn dates_in_args_are_refused() {
    assert_eq!(
        refused(
            "[workflows.w]\nstart_or_end = [{ action = \"token_bucket\", position = \"end\", args = { day = 2024-01-01 } }]\n"
        ),
        [
            "policies.toml: workflows.w.start_or_end[0].args.day: TOML dates and times cannot match a job's args; write the value as a string (line 2)"
        ]
    );
}

#[test]
fn sub_tables_and_arrays_of_tables_name_the_line() {
    assert_eq!(
        refused(
            "[workflows.w]\n\n[workflows.w.limits]\nmax_blocks = 1\nmax_jobs = 0\n\n[[workflows.w.same_args]]\naction = \"shell\"\narg = \"y\"\n\n[[workflows.w.same_args]]\naction = \"shell\"\nargz = \"y\"\n"
        ),
        [
            "policies.toml: workflows.w.limits.max_jobs: must be at least 1 (line 5)",
            "policies.toml: workflows.w.same_args[1].argz: unknown field `argz`, expected `action` or `arg` (line 13)",
        ]
    );
}

/// The example in the crate docs is a valid file, and means what the docs say.
#[test]
fn the_documented_example_loads() {
    let docs = include_str!("../src/lib.rs");
    let example: String = docs
        .lines()
        .skip_while(|l| *l != "//! ```toml")
        .skip(1)
        .take_while(|l| *l != "//! ```")
        .map(|l| format!("{}\n", l.trim_start_matches("//!").trim_start_matches(' ')))
        .collect();
    assert!(example.contains("[workflows.SatelliteDiskErase]"));
    let p = policies(&example);
    assert_eq!(
        p.workflow_names().collect::<Vec<_>>(),
        ["SatelliteDiskErase", "hello"]
    );
    let verdicts = p.check(&spec(ERASE));
    assert_eq!(verdicts.iter().count(), 8);
    // ERASE has no ./report.sh job at its end.
    assert_eq!(
        check(&p, &spec(ERASE)),
        [
            r#"policy start_or_end[1]: blocks: no shell job with argv[0] = "./report.sh" in the run; one must be among the last jobs"#
        ]
    );
}

// ---- run_as, and what messages may show ----

#[test]
fn run_as_names_the_user_of_a_workflows_shell_jobs() {
    let p = policies("[workflows.a]\nrun_as = \"deploy:ops\"\n[workflows.b]\n");
    assert_eq!(
        p.run_as("a").map(ToString::to_string).as_deref(),
        Some("deploy:ops")
    );
    assert_eq!(p.run_as("b"), None);
    assert_eq!(p.run_as("c"), None);
    assert_eq!(
        refused("[workflows.a]\nrun_as = \"a b\"\n"),
        [
            "policies.toml: workflows.a.run_as: \"a b\" is not \"user\" or \"user:group\" (names or numeric ids) (line 2)"
        ]
    );
    assert_eq!(
        refused("[workflows.a]\nrun_as = 0\n"),
        [
            "policies.toml: workflows.a.run_as: invalid type: integer `0`, expected a string (line 2)"
        ]
    );
}

#[test]
fn same_args_quotes_values_as_shown() {
    let p = policies(
        "[workflows.w]\nsame_args = [{ action = \"shell\", arg = \"env.DB_PASSWORD\" }]\n",
    );
    let real = spec(
        "name: w\nblocks: [{jobs: [{action: shell, args: {argv: [x], env: {DB_PASSWORD: hunter2}}}, {action: shell, args: {argv: [x], env: {DB_PASSWORD: other-pw}}}]}]\n",
    );
    let mut shown = real.clone();
    for j in &mut shown.blocks[0].jobs {
        j.args["env"]["DB_PASSWORD"] = "***".into();
    }
    let v = p.check_shown(&real, &shown);
    let text: Vec<String> = v.violations().iter().map(ToString::to_string).collect();
    assert_eq!(text.len(), 1, "{text:?}");
    assert!(text[0].contains("\"***\" differs from \"***\""), "{text:?}");
    assert!(!text[0].contains("hunter2") && !text[0].contains("other-pw"));
}

#[test]
fn secrets_are_named_by_the_policy_or_not_at_all() {
    let refs = spec(
        "name: w\nblocks: [{jobs: [{action: shell, args: {argv: [x], env: {A: {secret: db}}}}, {action: http, args: {url: {secret: hook}, headers: {X: {secret: other}}}}]}]\n",
    );
    // No `secrets` key: none may be named.
    assert_eq!(
        check(&policies("[workflows.w]\n"), &refs),
        [
            "policy secrets: blocks[0].jobs[0].args.env.A: secret \"db\": this workflow's policy lists no secrets; add secrets = [\"db\"] to allow it",
            "policy secrets: blocks[0].jobs[1].args.headers.X: secret \"other\": this workflow's policy lists no secrets; add secrets = [\"other\"] to allow it",
            "policy secrets: blocks[0].jobs[1].args.url: secret \"hook\": this workflow's policy lists no secrets; add secrets = [\"hook\"] to allow it",
        ]
    );
    assert_eq!(
        check(
            &policies("[workflows.w]\nsecrets = [\"db\", \"hook\"]\n"),
            &refs
        ),
        [
            "policy secrets: blocks[0].jobs[1].args.headers.X: secret \"other\" is not allowed for this workflow; allowed: \"db\", \"hook\""
        ]
    );
    assert!(check(&policies("[workflows.w]\nsecrets = [\"*\"]\n"), &refs).is_empty());
    // A spec without references passes an entry without the key, with no verdict added.
    let plain = spec("name: w\nblocks: [{jobs: [{action: noop}]}]\n");
    assert_eq!(policies("[workflows.w]\n").check(&plain).iter().count(), 1);
    assert_eq!(
        refused("[workflows.w]\nsecrets = [\"../x\"]\n"),
        [
            "policies.toml: workflows.w.secrets[0]: \"../x\" is not a secret name (letters, digits, '_', '.', '-'; at most 128 bytes) or \"*\" (line 2)"
        ]
    );
}
