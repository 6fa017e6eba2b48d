//! Characters and words of the prompts per task (a rough token budget: ~4 characters a token).
use teamtune_gridworld::{play_expert, Role, TaskSpec, BUILTIN_IDS};

fn main() {
    println!("| task | system chars | mean user chars | mean assistant chars | messages/agent |");
    println!("|---|---|---|---|---|");
    for id in BUILTIN_IDS {
        let spec = TaskSpec::builtin(id).unwrap();
        let (mut sys, mut user, mut asst, mut nu, mut na, mut convs, mut msgs) =
            (0, 0, 0, 0, 0, 0, 0);
        for seed in 0..50 {
            let rec = play_expert(&spec, seed).unwrap().record();
            for c in &rec.conversations {
                convs += 1;
                msgs += c.messages.len();
                for m in &c.messages {
                    match m.role {
                        Role::System => sys += m.content.len(),
                        Role::User | Role::Tool => {
                            user += m.content.len();
                            nu += 1
                        }
                        Role::Assistant => {
                            asst += m.content.len();
                            na += 1
                        }
                    }
                }
            }
        }
        println!(
            "| {id} | {} | {} | {} | {:.1} |",
            sys / convs,
            user / nu.max(1),
            asst / na.max(1),
            msgs as f64 / convs as f64
        );
    }
}
