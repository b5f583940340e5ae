"""dashboard sessions (revocable on logout) and the blob store's records (uploader, job, size)

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06 22:00:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('admin_sessions',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_admin_sessions'))
    )
    op.create_index(op.f('ix_admin_sessions_expires_at'), 'admin_sessions', ['expires_at'], unique=False)
    op.create_table('blob_objects',
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('stored_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('sha256', name=op.f('pk_blob_objects'))
    )
    op.create_table('blob_uploads',
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('uploader', sa.String(length=64), nullable=False),
    sa.Column('job_id', sa.String(length=64), nullable=False),
    sa.Column('uploaded_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['sha256'], ['blob_objects.sha256'], name=op.f('fk_blob_uploads_sha256_blob_objects'),
                            ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('sha256', 'uploader', 'job_id', name=op.f('pk_blob_uploads'))
    )
    op.create_index('ix_blob_uploads_uploader', 'blob_uploads', ['uploader'], unique=False)
    op.create_index('ix_blob_uploads_job', 'blob_uploads', ['job_id'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_blob_uploads_job', table_name='blob_uploads')
    op.drop_index('ix_blob_uploads_uploader', table_name='blob_uploads')
    op.drop_table('blob_uploads')
    op.drop_table('blob_objects')
    op.drop_index(op.f('ix_admin_sessions_expires_at'), table_name='admin_sessions')
    op.drop_table('admin_sessions')
