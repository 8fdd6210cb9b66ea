"""configs/gmpq/README.md and metafile.yml agree with each other and with
the repository: every config they name exists, every result in the
metafile is in the README table, and no row carries a placeholder."""
import os.path as osp
import re

import yaml

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
ZOO = osp.join(REPO, 'configs', 'gmpq')


def _readme():
    with open(osp.join(ZOO, 'README.md'), encoding='utf-8') as f:
        return f.read()


def _metafile():
    with open(osp.join(ZOO, 'metafile.yml'), encoding='utf-8') as f:
        return yaml.safe_load(f)


def test_metafile_models_name_real_configs_and_match_readme():
    meta = _metafile()
    readme = _readme()
    (collection, ) = meta['Collections']
    assert collection['Name'] == 'GMPQ'
    assert collection['Paper']['URL'] in readme
    assert meta['Models'], 'metafile lists no model'
    for model in meta['Models']:
        assert model['In Collection'] == 'GMPQ'
        assert osp.isfile(osp.join(REPO, model['Config'])), model['Config']
        row = next((line for line in readme.splitlines()
                    if line.startswith('|') and model['Name'] in line), None)
        assert row is not None, f'{model["Name"]} has no README row'
        for result in model['Results']:
            for metric, value in result['Metrics'].items():
                assert f'{value:.2f}' in row, (model['Name'], metric, row)


def test_readme_links_and_rows_are_real():
    readme = _readme()
    assert not re.search(r'DEMO_|TODO|XXX', readme)
    for link in re.findall(r'\]\((\./[^)]+)\)', readme):
        assert osp.exists(osp.normpath(osp.join(ZOO, link))), link
    # Rows of runs not made say so instead of carrying a number.
    imagenet = readme.split('### ImageNet-1k')[1].split('###')[0]
    rows = [
        line for line in imagenet.splitlines()
        if line.startswith('| ') and 'GMPQ' in line
    ]
    assert rows and all('not run yet' in row for row in rows)
