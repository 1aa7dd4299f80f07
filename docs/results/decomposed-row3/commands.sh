#!/usr/bin/env bash
# The commands of `python run_study.py --preset cpu`, in an order that respects their
# dependencies. run_study.py runs them (several at a time, skipping finished ones); this file lets
# anyone rerun or inspect any single step by hand. Run from the repository root.
# Configuration: preset cpu (configs/studies/cpu.yaml), --set world.pair_mentions=30, --set world.pairs=7000, --set world.mono_filler_documents=450, --set cpt.max_steps=2400, --set world.absent_places=8, --set world.en_only_places=8, --set settings=[bridges,no_bridges,mismatched_bridges], --set variants=[native]
set -euo pipefail

# generate the synthetic world
python synthetic_world.py --places 16 --relations 6 --en_count 24 --tgt_count 10 --low_resource_ratio 60.0 --statement_filler 1 --en_filler_documents 300 --mono_filler_documents 450 --pairs 7000 --diagnostic_pairs 200 --pair_mentions 30 --mono_mentions 2 --absent_places 8 --en_only_places 8 --output_dir study_runs/decomposed-row3/world --langs mn --seed 0 --name_variants native --resource mn=mixed

# pretrain the base model on the English corpus
python run_pretrain.py --config_name configs/tiny.json --config_overrides intermediate_size=256 --vocab_size 2000 --block_size 64 --logging_steps 50 --report_to none --max_steps 1000 --save_steps 1000 --per_device_train_batch_size 16 --learning_rate 0.003 --warmup_steps 50 --lr_scheduler_type cosine --weight_decay 0.01 --train_tokenizer --tokenizer_files study_runs/decomposed-row3/world/en_corpus.jsonl study_runs/decomposed-row3/world/mn/native/mono.jsonl --train_file study_runs/decomposed-row3/world/en_corpus.jsonl --output_dir study_runs/decomposed-row3/base --seed 0

# build the CPT dataset (mn, native names)
python build_pairs.py --replay_ratio 0.25 --lang mn --pairs_files study_runs/decomposed-row3/world/mn/native/pairs.jsonl --en_column en --tgt_column mn --mono_files study_runs/decomposed-row3/world/mn/native/mono.jsonl --replay_files study_runs/decomposed-row3/world/en_corpus.jsonl --tokenizer_name study_runs/decomposed-row3/base --block_size 64 --output_dir study_runs/decomposed-row3/data/mn-native --seed 0

# continual pretraining mn, native names, bridges, seed 0
python run_cpt.py --block_size 64 --logging_steps 50 --report_to none --max_steps 2400 --save_steps 100 --per_device_train_batch_size 8 --learning_rate 0.001 --warmup_steps 40 --lr_scheduler_type constant_with_warmup --weight_decay 0.01 --model_name_or_path study_runs/decomposed-row3/base --dataset_path study_runs/decomposed-row3/data/mn-native --lang mn --bridges --output_dir study_runs/decomposed-row3/cpt/mn-native-bridges-s0 --run_name mn-native-bridges-s0 --seed 0

# continual pretraining mn, native names, no bridges, seed 0
python run_cpt.py --block_size 64 --logging_steps 50 --report_to none --max_steps 2400 --save_steps 100 --per_device_train_batch_size 8 --learning_rate 0.001 --warmup_steps 40 --lr_scheduler_type constant_with_warmup --weight_decay 0.01 --model_name_or_path study_runs/decomposed-row3/base --dataset_path study_runs/decomposed-row3/data/mn-native --lang mn --no_bridges --output_dir study_runs/decomposed-row3/cpt/mn-native-no_bridges-s0 --run_name mn-native-no_bridges-s0 --seed 0

# continual pretraining mn, native names, mismatched bridges, seed 0
python run_cpt.py --block_size 64 --logging_steps 50 --report_to none --max_steps 2400 --save_steps 100 --per_device_train_batch_size 8 --learning_rate 0.001 --warmup_steps 40 --lr_scheduler_type constant_with_warmup --weight_decay 0.01 --model_name_or_path study_runs/decomposed-row3/base --dataset_path study_runs/decomposed-row3/data/mn-native --lang mn --mismatched_bridges --output_dir study_runs/decomposed-row3/cpt/mn-native-mismatched_bridges-s0 --run_name mn-native-mismatched_bridges-s0 --seed 0

# continual pretraining mn, native names, bridges, seed 1
python run_cpt.py --block_size 64 --logging_steps 50 --report_to none --max_steps 2400 --save_steps 100 --per_device_train_batch_size 8 --learning_rate 0.001 --warmup_steps 40 --lr_scheduler_type constant_with_warmup --weight_decay 0.01 --model_name_or_path study_runs/decomposed-row3/base --dataset_path study_runs/decomposed-row3/data/mn-native --lang mn --bridges --output_dir study_runs/decomposed-row3/cpt/mn-native-bridges-s1 --run_name mn-native-bridges-s1 --seed 1

# continual pretraining mn, native names, no bridges, seed 1
python run_cpt.py --block_size 64 --logging_steps 50 --report_to none --max_steps 2400 --save_steps 100 --per_device_train_batch_size 8 --learning_rate 0.001 --warmup_steps 40 --lr_scheduler_type constant_with_warmup --weight_decay 0.01 --model_name_or_path study_runs/decomposed-row3/base --dataset_path study_runs/decomposed-row3/data/mn-native --lang mn --no_bridges --output_dir study_runs/decomposed-row3/cpt/mn-native-no_bridges-s1 --run_name mn-native-no_bridges-s1 --seed 1

# continual pretraining mn, native names, mismatched bridges, seed 1
python run_cpt.py --block_size 64 --logging_steps 50 --report_to none --max_steps 2400 --save_steps 100 --per_device_train_batch_size 8 --learning_rate 0.001 --warmup_steps 40 --lr_scheduler_type constant_with_warmup --weight_decay 0.01 --model_name_or_path study_runs/decomposed-row3/base --dataset_path study_runs/decomposed-row3/data/mn-native --lang mn --mismatched_bridges --output_dir study_runs/decomposed-row3/cpt/mn-native-mismatched_bridges-s1 --run_name mn-native-mismatched_bridges-s1 --seed 1

# continual pretraining mn, native names, bridges, seed 2
python run_cpt.py --block_size 64 --logging_steps 50 --report_to none --max_steps 2400 --save_steps 100 --per_device_train_batch_size 8 --learning_rate 0.001 --warmup_steps 40 --lr_scheduler_type constant_with_warmup --weight_decay 0.01 --model_name_or_path study_runs/decomposed-row3/base --dataset_path study_runs/decomposed-row3/data/mn-native --lang mn --bridges --output_dir study_runs/decomposed-row3/cpt/mn-native-bridges-s2 --run_name mn-native-bridges-s2 --seed 2

# continual pretraining mn, native names, no bridges, seed 2
python run_cpt.py --block_size 64 --logging_steps 50 --report_to none --max_steps 2400 --save_steps 100 --per_device_train_batch_size 8 --learning_rate 0.001 --warmup_steps 40 --lr_scheduler_type constant_with_warmup --weight_decay 0.01 --model_name_or_path study_runs/decomposed-row3/base --dataset_path study_runs/decomposed-row3/data/mn-native --lang mn --no_bridges --output_dir study_runs/decomposed-row3/cpt/mn-native-no_bridges-s2 --run_name mn-native-no_bridges-s2 --seed 2

# continual pretraining mn, native names, mismatched bridges, seed 2
python run_cpt.py --block_size 64 --logging_steps 50 --report_to none --max_steps 2400 --save_steps 100 --per_device_train_batch_size 8 --learning_rate 0.001 --warmup_steps 40 --lr_scheduler_type constant_with_warmup --weight_decay 0.01 --model_name_or_path study_runs/decomposed-row3/base --dataset_path study_runs/decomposed-row3/data/mn-native --lang mn --mismatched_bridges --output_dir study_runs/decomposed-row3/cpt/mn-native-mismatched_bridges-s2 --run_name mn-native-mismatched_bridges-s2 --seed 2

# probe every checkpoint of mn-native-bridges-s0 (+ bridge diagnostic)
python run_eval.py --batch_size 128 --questions study_runs/decomposed-row3/world/mn/native/mn-culture-cloze_en.json study_runs/decomposed-row3/world/mn/native/mn-culture-cloze_mn.json --model_name_or_path study_runs/decomposed-row3/cpt/mn-native-bridges-s0 --diagnostic_pairs study_runs/decomposed-row3/world/mn/native/diagnostic_pairs.jsonl --name_alignment study_runs/decomposed-row3/world/mn/native/name_alignment.json --item_tiers study_runs/decomposed-row3/world/mn/native/item_tiers.json --output_dir study_runs/decomposed-row3/cpt/mn-native-bridges-s0/eval

# probe every checkpoint of mn-native-no_bridges-s0 (+ bridge diagnostic)
python run_eval.py --batch_size 128 --questions study_runs/decomposed-row3/world/mn/native/mn-culture-cloze_en.json study_runs/decomposed-row3/world/mn/native/mn-culture-cloze_mn.json --model_name_or_path study_runs/decomposed-row3/cpt/mn-native-no_bridges-s0 --diagnostic_pairs study_runs/decomposed-row3/world/mn/native/diagnostic_pairs.jsonl --name_alignment study_runs/decomposed-row3/world/mn/native/name_alignment.json --item_tiers study_runs/decomposed-row3/world/mn/native/item_tiers.json --output_dir study_runs/decomposed-row3/cpt/mn-native-no_bridges-s0/eval

# probe every checkpoint of mn-native-mismatched_bridges-s0 (+ bridge diagnostic)
python run_eval.py --batch_size 128 --questions study_runs/decomposed-row3/world/mn/native/mn-culture-cloze_en.json study_runs/decomposed-row3/world/mn/native/mn-culture-cloze_mn.json --model_name_or_path study_runs/decomposed-row3/cpt/mn-native-mismatched_bridges-s0 --diagnostic_pairs study_runs/decomposed-row3/world/mn/native/diagnostic_pairs.jsonl --name_alignment study_runs/decomposed-row3/world/mn/native/name_alignment.json --item_tiers study_runs/decomposed-row3/world/mn/native/item_tiers.json --output_dir study_runs/decomposed-row3/cpt/mn-native-mismatched_bridges-s0/eval

# probe every checkpoint of mn-native-bridges-s1 (+ bridge diagnostic)
python run_eval.py --batch_size 128 --questions study_runs/decomposed-row3/world/mn/native/mn-culture-cloze_en.json study_runs/decomposed-row3/world/mn/native/mn-culture-cloze_mn.json --model_name_or_path study_runs/decomposed-row3/cpt/mn-native-bridges-s1 --diagnostic_pairs study_runs/decomposed-row3/world/mn/native/diagnostic_pairs.jsonl --name_alignment study_runs/decomposed-row3/world/mn/native/name_alignment.json --item_tiers study_runs/decomposed-row3/world/mn/native/item_tiers.json --output_dir study_runs/decomposed-row3/cpt/mn-native-bridges-s1/eval

# probe every checkpoint of mn-native-no_bridges-s1 (+ bridge diagnostic)
python run_eval.py --batch_size 128 --questions study_runs/decomposed-row3/world/mn/native/mn-culture-cloze_en.json study_runs/decomposed-row3/world/mn/native/mn-culture-cloze_mn.json --model_name_or_path study_runs/decomposed-row3/cpt/mn-native-no_bridges-s1 --diagnostic_pairs study_runs/decomposed-row3/world/mn/native/diagnostic_pairs.jsonl --name_alignment study_runs/decomposed-row3/world/mn/native/name_alignment.json --item_tiers study_runs/decomposed-row3/world/mn/native/item_tiers.json --output_dir study_runs/decomposed-row3/cpt/mn-native-no_bridges-s1/eval

# probe every checkpoint of mn-native-mismatched_bridges-s1 (+ bridge diagnostic)
python run_eval.py --batch_size 128 --questions study_runs/decomposed-row3/world/mn/native/mn-culture-cloze_en.json study_runs/decomposed-row3/world/mn/native/mn-culture-cloze_mn.json --model_name_or_path study_runs/decomposed-row3/cpt/mn-native-mismatched_bridges-s1 --diagnostic_pairs study_runs/decomposed-row3/world/mn/native/diagnostic_pairs.jsonl --name_alignment study_runs/decomposed-row3/world/mn/native/name_alignment.json --item_tiers study_runs/decomposed-row3/world/mn/native/item_tiers.json --output_dir study_runs/decomposed-row3/cpt/mn-native-mismatched_bridges-s1/eval

# probe every checkpoint of mn-native-bridges-s2 (+ bridge diagnostic)
python run_eval.py --batch_size 128 --questions study_runs/decomposed-row3/world/mn/native/mn-culture-cloze_en.json study_runs/decomposed-row3/world/mn/native/mn-culture-cloze_mn.json --model_name_or_path study_runs/decomposed-row3/cpt/mn-native-bridges-s2 --diagnostic_pairs study_runs/decomposed-row3/world/mn/native/diagnostic_pairs.jsonl --name_alignment study_runs/decomposed-row3/world/mn/native/name_alignment.json --item_tiers study_runs/decomposed-row3/world/mn/native/item_tiers.json --output_dir study_runs/decomposed-row3/cpt/mn-native-bridges-s2/eval

# probe every checkpoint of mn-native-no_bridges-s2 (+ bridge diagnostic)
python run_eval.py --batch_size 128 --questions study_runs/decomposed-row3/world/mn/native/mn-culture-cloze_en.json study_runs/decomposed-row3/world/mn/native/mn-culture-cloze_mn.json --model_name_or_path study_runs/decomposed-row3/cpt/mn-native-no_bridges-s2 --diagnostic_pairs study_runs/decomposed-row3/world/mn/native/diagnostic_pairs.jsonl --name_alignment study_runs/decomposed-row3/world/mn/native/name_alignment.json --item_tiers study_runs/decomposed-row3/world/mn/native/item_tiers.json --output_dir study_runs/decomposed-row3/cpt/mn-native-no_bridges-s2/eval

# probe every checkpoint of mn-native-mismatched_bridges-s2 (+ bridge diagnostic)
python run_eval.py --batch_size 128 --questions study_runs/decomposed-row3/world/mn/native/mn-culture-cloze_en.json study_runs/decomposed-row3/world/mn/native/mn-culture-cloze_mn.json --model_name_or_path study_runs/decomposed-row3/cpt/mn-native-mismatched_bridges-s2 --diagnostic_pairs study_runs/decomposed-row3/world/mn/native/diagnostic_pairs.jsonl --name_alignment study_runs/decomposed-row3/world/mn/native/name_alignment.json --item_tiers study_runs/decomposed-row3/world/mn/native/item_tiers.json --output_dir study_runs/decomposed-row3/cpt/mn-native-mismatched_bridges-s2/eval

# probe the base model (mn, native names)
python run_eval.py --batch_size 128 --questions study_runs/decomposed-row3/world/mn/native/mn-culture-cloze_en.json study_runs/decomposed-row3/world/mn/native/mn-culture-cloze_mn.json --model_name_or_path study_runs/decomposed-row3/base --name_alignment study_runs/decomposed-row3/world/mn/native/name_alignment.json --item_tiers study_runs/decomposed-row3/world/mn/native/item_tiers.json --output_dir study_runs/decomposed-row3/base_eval/mn-native

# transfer analysis (mn, native names, 3 seed pairs)
python run_transfer.py --with_bridges study_runs/decomposed-row3/cpt/mn-native-bridges-s0/eval study_runs/decomposed-row3/cpt/mn-native-bridges-s1/eval study_runs/decomposed-row3/cpt/mn-native-bridges-s2/eval --without_bridges study_runs/decomposed-row3/cpt/mn-native-no_bridges-s0/eval study_runs/decomposed-row3/cpt/mn-native-no_bridges-s1/eval study_runs/decomposed-row3/cpt/mn-native-no_bridges-s2/eval --mismatched_bridges study_runs/decomposed-row3/cpt/mn-native-mismatched_bridges-s0/eval study_runs/decomposed-row3/cpt/mn-native-mismatched_bridges-s1/eval study_runs/decomposed-row3/cpt/mn-native-mismatched_bridges-s2/eval --item_tiers study_runs/decomposed-row3/world/mn/native/item_tiers.json --output_dir study_runs/decomposed-row3/transfer/mn-native

# cultural density of mn knowledge in both corpora (native names)
python run_density.py --top_k 50 --questions study_runs/decomposed-row3/world/mn/native/mn-culture-cloze_en.json study_runs/decomposed-row3/world/mn/native/mn-culture-cloze_mn.json --corpus_files en=study_runs/decomposed-row3/world/en_corpus.jsonl mn=study_runs/decomposed-row3/world/mn/native/mono.jsonl --output_dir study_runs/decomposed-row3/density/mn-native --predictions_with study_runs/decomposed-row3/cpt/mn-native-bridges-s0/eval --predictions_without study_runs/decomposed-row3/cpt/mn-native-no_bridges-s0/eval --source_corpus mn=en en=mn
